"""Data of the federated benchmark: digits, Dirichlet partitions, and CIFAR-10 batches in their real
on-disk format (Python-2 pickles) read with the restricted unpickler."""

import io
import os
import pickle
import struct

import numpy as np
import pytest

from cwmp.apps.federated.data import (
    CIFAR_TEST,
    CIFAR_TRAIN,
    DataError,
    dirichlet_partition,
    load_dataset,
    restricted_load,
)


# ---------------------------------------------------------------- writing the real CIFAR-10 format
class Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for CIFAR-10's batches (protocol 2): every str and
    bytes object as a Python-2 str (SHORT_BINSTRING / BINSTRING), and numpy's array reconstructor
    under its numpy-1 name ``numpy.core.multiarray._reconstruct``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        name = name or obj.__name__
        module = obj.__module__
        if module in ("numpy._core.multiarray", "numpy.core.multiarray"):
            module = "numpy.core.multiarray"
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)


def py2_dumps(obj) -> bytes:
    f = io.BytesIO()
    Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue()


def write_cifar_folder(root, per_batch=20, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name in (*CIFAR_TRAIN, CIFAR_TEST):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        batch = {b"batch_label": f"{name} of tiny".encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]}
        (root / name).write_bytes(py2_dumps(batch))
    return root


def test_fixture_writes_the_python2_opcodes_of_the_real_files(tmp_path):
    import pickletools

    raw = py2_dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [3]})
    ops = {op.name for op, _, _ in pickletools.genops(raw)}
    assert "GLOBAL" in ops and "SHORT_BINSTRING" in ops and "BINSTRING" in ops
    assert b"numpy.core.multiarray\n_reconstruct" in raw
    assert "BINUNICODE" not in ops and b"_codecs" not in raw


def test_cifar10_folder_in_the_real_format_loads(tmp_path):
    root = write_cifar_folder(tmp_path / "cifar-10-batches-py")
    ds = load_dataset(f"cifar10:{root}")
    assert ds.x_train.shape == (100, 3, 32, 32) and ds.x_test.shape == (20, 3, 32, 32)
    assert ds.x_train.dtype == np.float32 and ds.num_classes == 10
    raw = restricted_load(root / "data_batch_1")
    assert raw[b"data"].dtype == np.uint8 and raw[b"data"].shape == (20, 3072)
    # image 0, channel 0, pixel 0 normalised with CIFAR-10's mean and std
    expected = (raw[b"data"][0, 0] / 255.0 - 0.4914) / 0.2470
    assert ds.x_train[0, 0, 0, 0] == pytest.approx(expected, rel=1e-5)
    assert list(ds.y_train[:20]) == raw[b"labels"]


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    root = write_cifar_folder(tmp_path / "cifar-10-batches-py", per_batch=4)
    marker = tmp_path / "pwned"
    (root / "data_batch_3").write_bytes(py2_dumps({b"data": _Evil(marker), b"labels": []}))
    with pytest.raises(DataError, match=r"refused to load (posix|os)\.system.*not a genuine CIFAR-10 batch"):
        load_dataset(f"cifar10:{root}")
    assert not marker.exists()
    # the same file through plain pickle would have run the command: the refusal is what stops it
    (root / "evil").write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    with pytest.raises(DataError, match="refused"):
        restricted_load(root / "evil")
    assert not marker.exists()


def test_builtins_eval_is_refused(tmp_path):
    path = tmp_path / "b"
    path.write_bytes(b"\x80\x02cbuiltins\neval\nX\x0c\x00\x00\x00print('hi!')\x85R.")
    with pytest.raises(DataError, match=r"refused to load builtins\.eval"):
        restricted_load(path)


def test_truncated_and_wrong_batches_are_clear_errors(tmp_path):
    root = write_cifar_folder(tmp_path / "cifar-10-batches-py", per_batch=4)
    good = (root / "test_batch").read_bytes()
    (root / "test_batch").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="test_batch is not a readable CIFAR-10 pickle.*truncated or corrupt"):
        load_dataset(f"cifar10:{root}")
    (root / "test_batch").write_bytes(py2_dumps({b"labels": [1]}))
    with pytest.raises(DataError, match=r"lacks b'data' or b'labels'"):
        load_dataset(f"cifar10:{root}")
    (root / "test_batch").write_bytes(py2_dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [1, 2]}))
    with pytest.raises(DataError, match=r"uint8 array \(N, 3072\)"):
        load_dataset(f"cifar10:{root}")


def test_missing_folder_or_files_say_what_to_give(tmp_path):
    with pytest.raises(DataError, match="does not exist.*cifar-10-batches-py"):
        load_dataset(f"cifar10:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="lacks data_batch_1"):
        load_dataset(f"cifar10:{tmp_path}")
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")


def test_digits_split():
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0


def test_dirichlet_partition_is_seeded_disjoint_and_skewed():
    labels = load_dataset("digits").y_train
    a = dirichlet_partition(labels, 10, 0.5, seed=3, min_size=10)
    b = dirichlet_partition(labels, 10, 0.5, seed=3, min_size=10)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    joined = np.concatenate(a)
    assert joined.size == labels.size and np.unique(joined).size == labels.size  # every example once
    assert min(p.size for p in a) >= 10
    c = dirichlet_partition(labels, 10, 0.5, seed=4, min_size=10)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))

    def skew(parts):  # mean share of a client's examples in its largest class
        return np.mean([np.bincount(labels[p], minlength=10).max() / p.size for p in parts])

    assert skew(dirichlet_partition(labels, 10, 0.1, seed=0)) > skew(dirichlet_partition(labels, 10, 100.0, seed=0)) + 0.3


def test_dirichlet_partition_rejects_impossible_requests():
    labels = np.repeat(np.arange(10), 5)
    with pytest.raises(DataError, match="need 60 training examples"):
        dirichlet_partition(labels, 6, 0.5, seed=0, min_size=10)
    with pytest.raises(DataError, match="alpha must be"):
        dirichlet_partition(labels, 2, 0.0, seed=0)
