"""retrofit: give a pretrained timm Vision Transformer register tokens after the fact."""

__version__ = "0.1.0"

from .api import retrofit  # noqa: E402
from .backbones import load_backbone, load_checkpoint  # noqa: E402
from .cache import TargetCache, teacher_fingerprint  # noqa: E402
from .data import RetrofitDataModule  # noqa: E402
from .errors import RetrofitError  # noqa: E402
from .export import export, load  # noqa: E402
from .features import forward_tokens, patch_features  # noqa: E402
from .module import RetrofitModule  # noqa: E402
from .surgery import add_registers, count_registers  # noqa: E402
from .synthetic import plant_artifacts, synthetic_images  # noqa: E402
from .targets import DenoisedTargets, Targets, TargetSettings, crop_center  # noqa: E402

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
    "load_checkpoint",
    "patch_features",
    "plant_artifacts",
    "retrofit",
    "synthetic_images",
    "teacher_fingerprint",
]
