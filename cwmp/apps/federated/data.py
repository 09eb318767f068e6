"""Data for the federated benchmark: the datasets, a held-out test split, and non-IID label-skew
partitions of the training split over clients.

Datasets (``spec`` strings, as the command line takes them):

``digits``       scikit-learn's 8x8 handwritten digits (1797 images, 10 classes; ships with
                 scikit-learn, no download): 1x8x8 images scaled to [0, 1].
``cifar10:DIR``  CIFAR-10 from a local ``cifar-10-batches-py`` folder in its real on-disk format
                 (``data_batch_1`` .. ``data_batch_5`` and ``test_batch``: Python-2 pickles of a dict
                 with bytes keys, ``b'data'`` a uint8 array (10000, 3072) and ``b'labels'`` a list).
                 No torchvision and no download. The pickles are read with ``RestrictedUnpickler``,
                 which admits only numpy's array reconstruction and refuses every other global, so a
                 tampered file cannot run code.

Partitions: Dirichlet(alpha) label skew (Hsu, Qi and Brown 2019): for every class, the shares of
its training examples that go to each client are drawn from Dirichlet(alpha, ..., alpha); small
alpha gives each client few classes. Draws are repeated (seeded) until every client holds at least
``min_size`` examples.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from energyprof.errors import EnergyprofError

__all__ = [
    "DataError",
    "Dataset",
    "RestrictedUnpickler",
    "dirichlet_partition",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "restricted_load",
]

TEST_FRACTION_DIGITS = 0.2
SPLIT_SEED = 0  # the digits test split is the same for every run seed: accuracy is comparable across seeds
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # per-channel mean and std of CIFAR-10's training images
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class DataError(EnergyprofError):
    """A dataset that cannot be found, read or trusted, or partitions that cannot be made."""


@dataclass(frozen=True)
class Dataset:
    """Images (float32, N x C x H x W) and integer labels, split into train and test."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[2])


# ---------------------------------------------------------------------------------- datasets
def load_dataset(spec: str) -> Dataset:
    """``digits`` or ``cifar10:DIR`` (see the module docstring)."""
    if spec == "digits":
        return load_digits()
    if spec.startswith("cifar10:"):
        folder = spec.partition(":")[2]
        if not folder:
            raise DataError("cifar10 needs its folder: --dataset cifar10:/path/to/cifar-10-batches-py")
        return load_cifar10(folder)
    raise DataError(f"unknown dataset {spec!r}; give 'digits' or 'cifar10:DIR' (a cifar-10-batches-py folder)")


def load_digits() -> Dataset:
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION_DIGITS, random_state=SPLIT_SEED, stratify=y
    )
    return Dataset("digits", x_train, y_train, x_test, y_test, 10)


def load_cifar10(folder: str | Path) -> Dataset:
    root = Path(folder)
    if not root.is_dir():
        raise DataError(
            f"CIFAR-10 folder {root} does not exist; give the extracted 'cifar-10-batches-py' folder "
            "(from cifar-10-python.tar.gz) as --dataset cifar10:DIR"
        )
    missing = [name for name in (*CIFAR_TRAIN, CIFAR_TEST) if not (root / name).is_file()]
    if missing:
        raise DataError(
            f"{root} lacks {', '.join(missing)}; it must be the extracted 'cifar-10-batches-py' folder "
            "(data_batch_1 .. data_batch_5 and test_batch)"
        )
    train = [_read_cifar_batch(root / name) for name in CIFAR_TRAIN]
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    x_test, y_test = _read_cifar_batch(root / CIFAR_TEST)
    mean = np.asarray(CIFAR_MEAN, np.float32)[None, :, None, None]
    std = np.asarray(CIFAR_STD, np.float32)[None, :, None, None]

    def images(raw: np.ndarray) -> np.ndarray:
        return ((raw.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0) - mean) / std

    return Dataset(f"cifar10:{root}", images(x_train), y_train, images(x_test), y_test, 10)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = restricted_load(path)
    if not isinstance(batch, dict):
        raise DataError(f"{path} holds a {type(batch).__name__}, not a CIFAR-10 batch dict")
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if data is None or labels is None:
        keys = ", ".join(repr(k) for k in batch) or "none"
        raise DataError(f"{path} is not a CIFAR-10 batch: it lacks b'data' or b'labels' (keys: {keys})")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        shape = getattr(data, "shape", None)
        raise DataError(f"{path}: b'data' must be a uint8 array (N, 3072), got {type(data).__name__} {shape}")
    y = np.asarray(labels)
    if y.shape != (data.shape[0],) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() > 9:
        raise DataError(f"{path}: b'labels' must be {data.shape[0]} integers in 0..9")
    return data, y.astype(np.int64)


# ------------------------------------------------------------------------ restricted unpickler
def _allowed_globals() -> dict[tuple[str, str], object]:
    from numpy._core import multiarray  # numpy >= 2; the files name numpy.core (numpy 1.x)

    return {
        # Python 3's pickle (protocols 0-2) writes a bytes object as _codecs.encode(str, "latin1"):
        # a batch re-pickled by Python 3 holds its bytes keys and its dtype's bytes that way
        ("_codecs", "encode"): _latin1_encode,
        ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


def _latin1_encode(text: object, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as Python 3's pickle uses it for bytes, and nothing else: a str to bytes
    through latin-1."""
    if not isinstance(text, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise DataError(f"refused _codecs.encode({type(text).__name__}, {encoding!r}): a CIFAR-10 batch uses it only "
                        "to rebuild bytes from latin-1 text")
    return text.encode("latin1", errors)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR-10's batches: strings, numbers, lists, dicts, and numpy arrays
    rebuilt by ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and ``numpy.dtype``.
    Any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ...) is refused before
    it is looked up, so nothing named in the file is ever called."""

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle's API
        allowed = _allowed_globals()
        if (module, name) not in allowed:
            raise DataError(
                f"refused to load {module}.{name}: a CIFAR-10 batch holds only numpy arrays, lists and "
                "strings, so this file is not a genuine CIFAR-10 batch (it may be malicious); "
                "re-download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html"
            )
        return allowed[(module, name)]


def restricted_load(path: str | Path) -> object:
    """Read one Python-2 pickle (``encoding='bytes'``, as CIFAR-10's files need) with
    ``RestrictedUnpickler``; a truncated or malformed file is a ``DataError`` naming it."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        return RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        raise DataError(
            f"{path} is not a readable CIFAR-10 pickle ({type(exc).__name__}: {exc}); the file is truncated "
            "or corrupt: re-extract cifar-10-python.tar.gz"
        ) from None


# ---------------------------------------------------------------------------------- partitions
def dirichlet_partition(
    labels: np.ndarray, clients: int, alpha: float, seed: int, min_size: int = 10, max_tries: int = 1000
) -> list[np.ndarray]:
    """Indices of ``labels`` for each client: Dirichlet(alpha) label skew, every client holding at
    least ``min_size`` examples. Deterministic in ``seed``; each index is given to exactly one client."""
    labels = np.asarray(labels)
    n = labels.shape[0]
    if clients < 1:
        raise DataError(f"clients must be >= 1, got {clients}")
    if not (alpha > 0 and np.isfinite(alpha)):
        raise DataError(f"alpha must be a finite number > 0 (small: strong label skew), got {alpha}")
    if min_size < 0:
        raise DataError(f"min_size must be >= 0, got {min_size}")
    if clients * min_size > n:
        raise DataError(
            f"{clients} clients x at least {min_size} examples need {clients * min_size} training examples, "
            f"but there are {n}; use fewer clients or a smaller minimum partition size"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for c in classes:
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * idx.size).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(p.size for p in out) >= min_size:
            return out
    raise DataError(
        f"no Dirichlet(alpha={alpha}) draw in {max_tries} gave all {clients} clients >= {min_size} examples; "
        "raise alpha, lower the minimum partition size, or use fewer clients"
    )
