"""The last block's attention of a timm ViT, read inside timm's own forward through module hooks.

Queries and keys are the outputs of the block's ``q_norm`` / ``k_norm`` (Identity without qk-norm),
before any rotary embedding. Attention probabilities are the input of its ``attn_drop``, with fused
attention switched off for that one forward. Nothing of timm's attention arithmetic is re-done here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from timm.layers import Attention, AttentionRope
from timm.models.eva import EvaAttention
from torch import Tensor, nn

from .errors import RetrofitError
from .features import forward_tokens, grid_size, inference, model_device
from .surgery import check_supported, has_class_token

ATTENTION_CLASSES: tuple[type[nn.Module], ...] = (Attention, AttentionRope, EvaAttention)
NO_CLS_NOTE = "no class token, so no CLS attention"


def last_attention(model: nn.Module) -> nn.Module:
    """The last block's attention layer, checked to be one whose hooks we know."""
    check_supported(model)
    attn = model.blocks[-1].attn
    if not isinstance(attn, ATTENTION_CLASSES):
        names = ", ".join(c.__name__ for c in ATTENTION_CLASSES)
        raise RetrofitError(
            f"attention maps need the last block's attention to be one of {names}, "
            f"got {type(attn).__name__}: use norm and PCA maps for this model."
        )
    return attn


@contextmanager
def _hooked(attn: nn.Module, probs: bool) -> Iterator[dict[str, Tensor]]:
    """Capture q, k (and, with ``probs``, the attention probabilities) of ``attn`` during the block."""
    seen: dict[str, Tensor] = {}

    def keep(name: str, from_input: bool = False):
        return lambda _module, args, out: seen.__setitem__(name, args[0] if from_input else out)

    handles = [attn.q_norm.register_forward_hook(keep("q")), attn.k_norm.register_forward_hook(keep("k"))]
    fused = attn.fused_attn
    if probs:
        handles.append(attn.attn_drop.register_forward_hook(keep("probs", from_input=True)))
        attn.fused_attn = False  # the fused kernel never forms the probabilities
    try:
        yield seen
    finally:
        attn.fused_attn = fused
        for handle in handles:
            handle.remove()


def forward_with_attention(model: nn.Module, images: Tensor, probs: bool = False) -> tuple[dict[str, Tensor], Tensor]:
    """One eval-mode forward without gradients: the last block's q, k (B, heads, N, head_dim) - grouped-query
    keys expanded to every head - with ``probs`` its attention (B, heads, N, N), and the final tokens."""
    attn = last_attention(model)
    with inference(model), _hooked(attn, probs) as seen:
        tokens = forward_tokens(model, images.to(model_device(model)))
    heads = attn.num_heads
    seen["k"] = seen["k"].repeat_interleave(heads // seen["k"].shape[1], dim=1)
    return seen, tokens


def last_block_qk(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """Queries and keys of the last block, each (B, heads, N, head_dim) over all N tokens, prefix first.

    As the block's qk-norm gives them, before a rotary embedding (Eva), so keys compare content.
    LOST uses the keys. Runs in eval mode without gradients; the model's mode is restored.
    """
    seen, _ = forward_with_attention(model, images)
    return seen["q"], seen["k"]


def cls_probs(model: nn.Module, probs: Tensor, grid: tuple[int, int]) -> Tensor:
    """The class token's row of attention probabilities (B, heads, N, N), on the patch grid (B, heads, H, W)."""
    return probs[:, :, 0, model.num_prefix_tokens:].reshape(*probs.shape[:2], *grid)


def cls_attention(model: nn.Module, images: Tensor) -> Tensor:
    """Last-block attention of the class token to every patch, (B, heads, H, W) probabilities.

    Registers take part of the class token's attention, so a row sums to less than 1 with them.
    """
    if not has_class_token(model):
        raise RetrofitError(f"this model has {NO_CLS_NOTE}: use norm or PCA maps instead.")
    seen, _ = forward_with_attention(model, images, probs=True)
    return cls_probs(model, seen["probs"], grid_size(model, *images.shape[-2:]))
