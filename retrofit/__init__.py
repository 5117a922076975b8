"""retrofit: give a pretrained timm Vision Transformer register tokens after the fact."""

__version__ = "0.1.0"

from .backbones import load_backbone, load_checkpoint  # noqa: E402
from .errors import RetrofitError  # noqa: E402
from .export import export, load  # noqa: E402
from .features import forward_tokens, patch_features  # noqa: E402
from .surgery import add_registers, count_registers  # noqa: E402

__all__ = [
    "RetrofitError",
    "add_registers",
    "count_registers",
    "export",
    "forward_tokens",
    "load",
    "load_backbone",
    "load_checkpoint",
    "patch_features",
]
