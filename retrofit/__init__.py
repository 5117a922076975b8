"""retrofit: give a pretrained timm Vision Transformer register tokens after the fact.

The names below load on first use, so that ``import retrofit`` (and the console script, which must answer
Ctrl-C with one line even while torch and Lightning are still importing) costs nothing up front.
"""

from __future__ import annotations

import importlib
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import retrofit
    from .backbones import load_backbone
    from .cache import TargetCache, teacher_fingerprint
    from .data import RetrofitDataModule
    from .errors import RetrofitError
    from .export import export, load
    from .features import forward_tokens, patch_features
    from .module import RetrofitModule
    from .surgery import add_registers, count_registers
    from .synthetic import plant_artifacts, synthetic_images
    from .targets import DenoisedTargets, Targets, TargetSettings, crop_center

__version__ = version("retrofit")

_HOMES = {
    "retrofit": "api",
    "load_backbone": "backbones",
    "TargetCache": "cache",
    "teacher_fingerprint": "cache",
    "RetrofitDataModule": "data",
    "RetrofitError": "errors",
    "export": "export",
    "load": "export",
    "forward_tokens": "features",
    "patch_features": "features",
    "RetrofitModule": "module",
    "add_registers": "surgery",
    "count_registers": "surgery",
    "plant_artifacts": "synthetic",
    "synthetic_images": "synthetic",
    "DenoisedTargets": "targets",
    "Targets": "targets",
    "TargetSettings": "targets",
    "crop_center": "targets",
}
__all__ = [  # a literal list, for linters and readers; tests/test_api.py checks it against _HOMES
    "DenoisedTargets",
    "RetrofitDataModule",
    "RetrofitError",
    "RetrofitModule",
    "TargetCache",
    "TargetSettings",
    "Targets",
    "add_registers",
    "count_registers",
    "crop_center",
    "export",
    "forward_tokens",
    "load",
    "load_backbone",
    "patch_features",
    "plant_artifacts",
    "retrofit",
    "synthetic_images",
    "teacher_fingerprint",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'retrofit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
