"""Architectures by name: small built-ins and torchvision classifiers adapted to the data.

A builder takes `in_shape` (C,H,W or D,) and `num_classes`, plus its own keyword arguments,
which a spec passes as `arch_kwargs`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from worker.pipeline.errors import DatasetIncompatible
from worker.pipeline.registry import Registry

ARCHS: Registry[Callable[..., nn.Module]] = Registry("arch")


def build_model(arch: str, in_shape: Sequence[int], num_classes: int, **kwargs: Any) -> nn.Module:
    return ARCHS.get(arch)(in_shape=tuple(in_shape), num_classes=num_classes, **kwargs)


def _need_image(arch: str, in_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(in_shape) != 3:
        raise DatasetIncompatible(
            f"arch {arch!r} needs images (C,H,W); the dataset has feature rows of shape {in_shape}"
        )
    return in_shape  # type: ignore[return-value]


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int], dropout: float):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@ARCHS.register("mlp")
def mlp(
    in_shape: tuple[int, ...],
    num_classes: int,
    hidden: Sequence[int] = (256, 128),
    dropout: float = 0.1,
) -> nn.Module:
    return MLP(math.prod(in_shape), num_classes, hidden, dropout)


@ARCHS.register("mlp_small")
def mlp_small(
    in_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int] = (32,)
) -> nn.Module:
    return MLP(math.prod(in_shape), num_classes, hidden, 0.0)


class ConvNet(nn.Module):
    """conv-bn-relu blocks (2x2 max-pool while the map is larger than 4x4), global pool, linear."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, widths: Sequence[int]):
        super().__init__()
        channels, size = in_shape[0], min(in_shape[1], in_shape[2])
        blocks: list[nn.Module] = []
        for w in widths:
            block: list[nn.Module] = [
                nn.Conv2d(channels, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
            ]
            if size > 4:
                block.append(nn.MaxPool2d(2))
                size //= 2
            blocks.append(nn.Sequential(*block))
            channels = w
        self.features = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


@ARCHS.register("cnn_small")
def cnn_small(
    in_shape: tuple[int, ...], num_classes: int, widths: Sequence[int] = (16, 32, 64)
) -> nn.Module:
    return ConvNet(_need_image("cnn_small", in_shape), num_classes, widths)


@ARCHS.register("cnn_tiny")
def cnn_tiny(
    in_shape: tuple[int, ...], num_classes: int, widths: Sequence[int] = (16, 32)
) -> nn.Module:
    return ConvNet(_need_image("cnn_tiny", in_shape), num_classes, widths)


@ARCHS.register("cnn_large")
def cnn_large(
    in_shape: tuple[int, ...], num_classes: int, widths: Sequence[int] = (64, 128, 256, 256)
) -> nn.Module:
    return ConvNet(_need_image("cnn_large", in_shape), num_classes, widths)


# --- torchvision ---------------------------------------------------------------------------

TORCHVISION_ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
)


def _first_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            return parent, attr, module
    raise RuntimeError("model has no Conv2d")


def _torchvision(name: str, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A torchvision classifier with its stem fitted to the data's channels and size.

    Weights start random: pretrained weights would need a download and do not fit a stem
    that was changed for the channel count anyway.
    """
    from torchvision import models

    c, h, w = _need_image(name, in_shape)
    model = getattr(models, name)(weights=None, num_classes=num_classes)
    parent, attr, conv = _first_conv(model)
    small = min(h, w) < 96  # ImageNet stems downsample 4x at once; too much for 32px inputs
    stride = 1 if small else conv.stride
    kernel = 3 if small else conv.kernel_size
    padding = 1 if small else conv.padding
    new = nn.Conv2d(c, conv.out_channels, kernel, stride, padding, bias=conv.bias is not None)
    setattr(parent, attr, new)
    if small and isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
        model.maxpool = nn.Identity()
    return model


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    @functools.wraps(_torchvision)
    def build(in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return _torchvision(name, in_shape, num_classes)

    return build


for _name in TORCHVISION_ARCHS:
    ARCHS.add(_name, _torchvision_builder(_name))


# --- pruned shapes -------------------------------------------------------------------------
# Channel pruning changes layer widths. Recording each layer's shape lets a pruned model be
# rebuilt from its arch name plus this config, with weights from safetensors: no pickling.


def layer_config(model: nn.Module) -> dict[str, dict[str, int]]:
    cfg: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            cfg[name] = {"in": m.in_channels, "out": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.Linear):
            cfg[name] = {"in": m.in_features, "out": m.out_features}
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            cfg[name] = {"out": m.num_features}
    return cfg


def apply_layer_config(model: nn.Module, cfg: dict[str, dict[str, int]]) -> nn.Module:
    """Resize layers of a freshly built model in place to the recorded (pruned) shapes."""
    for name, shape in cfg.items():
        m = model.get_submodule(name)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(m, nn.Conv2d):
            if (m.in_channels, m.out_channels, m.groups) == (
                shape["in"],
                shape["out"],
                shape["groups"],
            ):
                continue
            new: nn.Module = nn.Conv2d(
                shape["in"],
                shape["out"],
                m.kernel_size,
                m.stride,
                m.padding,
                m.dilation,
                shape["groups"],
                m.bias is not None,
                m.padding_mode,
            )
        elif isinstance(m, nn.Linear):
            if (m.in_features, m.out_features) == (shape["in"], shape["out"]):
                continue
            new = nn.Linear(shape["in"], shape["out"], m.bias is not None)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            if m.num_features == shape["out"]:
                continue
            new = type(m)(shape["out"], m.eps, m.momentum, m.affine, m.track_running_stats)
        else:
            raise ValueError(f"layer {name!r} of type {type(m).__name__} cannot be resized")
        setattr(parent, attr, new)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_layers(model: nn.Module) -> int:
    """Modules holding parameters of their own (conv, linear, norm): what "layers" means in
    the spec limits; containers and activations are free."""
    return sum(1 for m in model.modules() if next(m.parameters(recurse=False), None) is not None)


def check_arch(
    arch: str, arch_kwargs: dict[str, Any], in_shape: Sequence[int], num_classes: int
) -> nn.Module:
    """Build on the meta device (no memory, no time) to check an arch fits the data's shape.

    Raises DatasetIncompatible (wrong kind of input) or ValueError/TypeError from the builder.
    """
    with torch.device("meta"):
        model = build_model(arch, in_shape, num_classes, **arch_kwargs)
        # eval: batch norm in training mode refuses a single value per channel, which a
        # deep net reaches on small inputs (resnet18 on 8x8 ends at 1x1).
        model.eval()(torch.empty(2, *in_shape))
    return model
