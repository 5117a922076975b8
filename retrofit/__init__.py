"""retrofit: give a pretrained timm Vision Transformer register tokens after the fact."""

from importlib.metadata import version

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

__all__ = [
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
