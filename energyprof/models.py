"""Built-in models, defined here (no torchvision), and user models by ``module:attribute``.

``mlp``       a 3-layer perceptron for 8x8 (digits, 64 features) or flattened inputs
``cnn``       a small CIFAR-style CNN (two 5x5 conv layers, three linear layers)
``resnet18``  ResNet-18, CIFAR variant (3x3 stem, no max-pool; about 11.2 M parameters)

Every builder takes ``in_channels``, ``image_size`` and ``num_classes`` so that the same names fit
digits (1x8x8, 10 classes) and CIFAR-10 (3x32x32, 10 classes). The default shapes are CIFAR-10's
except for ``mlp``, whose default input is digits' 64 features.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import nn

from energyprof.errors import EnergyprofError

__all__ = ["MODELS", "ModelError", "build_model", "resolve_model", "model_label", "model_names", "load_model"]


class ModelError(EnergyprofError, ValueError):
    """A model spec that names no usable model (unknown, not importable, a factory that fails, no
    parameters)."""


class MLP(nn.Sequential):
    def __init__(self, in_features: int = 64, hidden: tuple[int, ...] = (256, 128), num_classes: int = 10) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class SmallCNN(nn.Module):
    """The classic small CIFAR CNN (conv 6@5x5, pool, conv 16@5x5, pool, 120, 84, classes), with
    padding so that it also accepts 8x8 digits."""

    def __init__(self, in_channels: int = 3, image_size: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.pool = nn.MaxPool2d(2)
        side = image_size // 4
        self.fc1 = nn.Linear(64 * side * side, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (He et al. 2016, CIFAR variant: 3x3 stem, stride 1, no max-pool)."""

    def __init__(self, in_channels: int = 3, image_size: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.pool(out), 1))


def _mlp(in_channels: int = 1, image_size: int = 8, num_classes: int = 10) -> nn.Module:
    return MLP(in_channels * image_size * image_size, num_classes=num_classes)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    "cnn": SmallCNN,
    "resnet18": ResNet18,
}


def build_model(
    name: str, *, in_channels: int | None = None, image_size: int | None = None, num_classes: int = 10, seed: int = 0
) -> nn.Module:
    """A built-in model by name, with seeded initial weights. Unset shapes take the model's defaults
    (digits for ``mlp``, CIFAR-10 for ``cnn`` and ``resnet18``)."""
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; built-in models: {', '.join(MODELS)}, or give module:attribute")
    kwargs: dict[str, int] = {"num_classes": num_classes}
    if in_channels is not None:
        kwargs["in_channels"] = in_channels
    if image_size is not None:
        kwargs["image_size"] = image_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](**kwargs)


def resolve_model(spec: str, *, seed: int = 0, **shape: int) -> nn.Module:
    """A built-in name, or ``module:attribute`` naming an ``nn.Module`` instance or a zero-argument
    factory (a class or function) that returns one."""
    if not spec.strip():
        raise ModelError("an empty model name; give mlp, cnn, resnet18 or module:attribute")
    if ":" not in spec:
        return build_model(spec, seed=seed, **shape)
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelError(f"model {spec!r}: give module:attribute, both parts non-empty")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while it is imported
        raise ModelError(f"cannot import {module_name!r} for model {spec!r}: {type(exc).__name__}: {exc}") from None
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise ModelError(f"module {module_name!r} has no attribute {attr!r} (model {spec!r})") from None
    if isinstance(obj, nn.Module):
        return obj
    if callable(obj):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                made = obj()
            except Exception as exc:  # the user's factory: its failure is the user's error, said in one line
                raise ModelError(f"model {spec!r}: calling {attr}() raised {type(exc).__name__}: {exc}") from None
        if isinstance(made, nn.Module):
            return made
        raise ModelError(f"{spec} returned a {type(made).__name__}, not a torch.nn.Module")
    raise ModelError(f"{spec} is a {type(obj).__name__}; give a torch.nn.Module or a zero-argument factory")


def model_names(values: list[str] | tuple[str, ...], default: str | None = None) -> list[str]:
    """Names given as repeated and/or comma-separated options (``--model a,b --model c``); an
    empty name is an error, never the default; no value at all gives ``[default]``."""
    if not values:
        if default is None:
            raise ModelError("no model given")
        return [default]
    names = [m.strip() for part in values for m in part.split(",")]
    if any(not m for m in names):
        raise ModelError(f"--model {','.join(values)!r} holds an empty model name; give mlp, cnn, resnet18 or "
                         "module:attribute")
    return names


def load_model(spec: str, *, seed: int = 0, **shape: int) -> nn.Module:
    """:func:`resolve_model`, and a model with parameters to price (anything else is a
    :class:`ModelError` saying so)."""
    module = resolve_model(spec, seed=seed, **shape)
    if not any(p.numel() for p in module.parameters()):
        raise ModelError(f"model {spec!r} has no parameters: it makes no update, so there is nothing to calibrate "
                         "or prune; give a model with trainable tensors")
    return module


def model_label(spec: str) -> str:
    """The name a profile stores a model's table under: the built-in name, or ``module:attribute``."""
    return spec
