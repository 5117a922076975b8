"""RetrofitModule: the student learns to match the denoised features of its frozen original (PH-Reg).

The student is the teacher plus register tokens (:func:`retrofit.surgery.add_registers`); a freeze
preset picks what it may change. Only patch features enter the loss, so whatever the student does to
get rid of artifacts - park global information in the registers, switch off the units that make them -
is its choice. By default (``freeze="auto"``) it may change the registers and the block where the
artifacts start, found on the first training batch: artifacts are made there, by a few MLP units, and a
student that can only reach the last block learns to hide their norm, not to repair the features
(docs/method.md).
"""

from __future__ import annotations

import copy
import logging
import math
import textwrap
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from peft import LoraConfig, PeftModel, get_peft_model
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn

from ._export import export
from .backbones import load_backbone, weights_source
from .cache import TargetCache
from .errors import RetrofitError, first_line
from .features import block_indices, patch_features, patch_size, square_size
from .metrics import outlier_mask
from .neurons import RegisterNeurons, find_register_neurons
from .residual import blocks_text
from .surgery import RegisterInit, add_registers, check_supported, timm_model
from .targets import DenoisedTargets, Targets, TargetSettings, crop_center

FreezePreset = Literal["auto", "phreg", "last-k", "lora", "full"]
Schedule = Literal["exp", "cosine"]
LORA_TARGETS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"  # a plain "proj" would also hit patch_embed.proj
HEAD_PREFIXES = ("head", "fc_norm", "attn_pool")  # never reach the patch features: frozen even in `full`
# The frozen teacher is in eval mode on purpose; Lightning would warn about it at the start of every fit.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
# Lightning's own internals under newer torch, and an advert for its hosted logger on every Trainer: nothing a
# user of retrofit can act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "💡 Tip" not in r.getMessage())


def _starts(name: str, prefixes: Sequence[str]) -> bool:
    """``name`` is one of ``prefixes`` or lies below one (prefixes ending in '.' name modules)."""
    return any(name == p or name.startswith(p if p.endswith(".") else p + ".") for p in prefixes)


def trainable_prefixes(model: nn.Module, freeze: FreezePreset, last_k: int = 1,
                       artifact_blocks: Sequence[int] = ()) -> list[str]:
    """Parameter-name prefixes a freeze preset trains (before any LoRA adapters are added).

    ``auto``: registers and ``artifact_blocks``, the blocks where the artifacts build (none: registers only).
    ``phreg``: registers, position embedding, patch embedding and the last block - the last two for
    pre-norm CLIP-style models (``norm_pre`` is not Identity). ``last-k``: registers, position
    embedding, last ``last_k`` blocks. ``lora``: registers and position embedding (the adapters come on
    top). ``full``: everything that reaches the patch features. The final norm is trained by ``full`` only.
    """
    depth = len(model.blocks)
    tokens = [n for n in ("reg_token", "pos_embed") if getattr(model, n, None) is not None]
    if freeze == "auto":  # registers and the blocks that make the artifacts; nothing else to drift
        registers = ["reg_token"] if getattr(model, "reg_token", None) is not None else []
        return registers + [f"blocks.{i}." for i in artifact_blocks]
    if freeze == "phreg":
        last = 2 if not isinstance(getattr(model, "norm_pre", nn.Identity()), nn.Identity) else 1
        return tokens + ["patch_embed."] + [f"blocks.{i}." for i in range(depth - last, depth)]
    if freeze == "last-k":
        if not 1 <= last_k <= depth:
            raise RetrofitError(f"last_k must be in 1..{depth} for this {depth}-block model, got {last_k}.")
        return tokens + [f"blocks.{i}." for i in range(depth - last_k, depth)]
    if freeze == "lora":
        return tokens
    if freeze == "full":
        return [n for n, _ in model.named_parameters() if not _starts(n, HEAD_PREFIXES)]
    raise RetrofitError(f"unknown freeze preset {freeze!r}: choose phreg, last-k, lora or full.")


def _add_lora(model: nn.Module, rank: int, alpha: float, dropout: float, seed: int) -> PeftModel:
    """Wrap ``model`` in LoRA adapters, initialised from ``seed`` so that a rebuilt module is identical."""
    if rank < 1:
        raise RetrofitError(f"lora_rank must be >= 1, got {rank}.")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return get_peft_model(model, config)
    except ValueError as e:
        raise RetrofitError(
            f"LoRA found no attn.qkv/attn.proj/mlp.fc1/mlp.fc2 layers in this model ({first_line(e, 80)}): "
            "use freeze='last-k' or 'full'."
        ) from e


def _lr_factor(step: int, total: int, warmup: int, schedule: Schedule, floor: float) -> float:
    """Multiplier of the base lr at ``step``: linear warmup, then exp decay or cosine down to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "exp":
        return floor**t
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def _loss_terms(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Mean patch cosine and MSE, in float32 whatever the autocast dtype."""
    pred, target = pred.float(), target.float()
    return F.cosine_similarity(pred, target, dim=-1).mean(), F.mse_loss(pred, target)


def _target_settings(targets: TargetSettings | dict[str, Any] | None) -> TargetSettings:
    """TargetSettings from a recipe's mapping, naming an unknown key instead of failing with a TypeError."""
    if not isinstance(targets, dict):
        return targets or TargetSettings()
    known = {f.name for f in fields(TargetSettings)}
    unknown = sorted(set(targets) - known)
    if unknown:
        raise RetrofitError(f"unknown target setting {unknown[0]!r}: use one of {', '.join(sorted(known))}.")
    return TargetSettings(**targets)


class RetrofitModule(L.LightningModule):
    """Self-distillation of a timm ViT into the same ViT with register tokens.

    Args:
        backbone: the ViT to retrofit: a timm name, ``hf-hub:``/``local-dir:`` name or a directory from
            ``retrofit export`` (see :func:`retrofit.load_backbone`), or an ``nn.Module`` (Python API;
            it is copied, never modified, and must be passed again to resume).
        checkpoint: local weights file for a timm name (offline use); None downloads the hub weights.
        model_kwargs: extra ``timm.create_model`` arguments, e.g. ``{"img_size": 224}``.
        num_registers: register tokens to add (PH-Reg: 16; gains are small beyond 4).
        register_init: how new registers start: ``mean_patch`` (the token of a blank patch: it joins attention
            as a patch does, so the model changes least at step 0 - cosine 0.990 on DINOv2 ViT-S/14 against 0.934
            for near-zero registers, whose normed key pulls attention), ``timm`` (std 1e-6), ``randn``
            (randn / sqrt(dim), PH-Reg), ``zeros`` or ``cls``.
        freeze: what trains: ``auto`` (registers and the blocks where the artifacts build, ``artifact_blocks``;
            registers only for a model without artifacts), ``phreg`` (registers, position and patch embedding,
            last block - two for CLIP-style models; PH-Reg's choice), ``last-k`` (registers, position
            embedding, last ``last_k`` blocks), ``lora`` (LoRA on the blocks' attn.qkv/attn.proj/mlp.fc1/mlp.fc2
            plus registers and position embedding; merged into plain weights on export) or ``full``. The final
            norm trains only with ``full``.
        last_k: blocks trained by ``freeze="last-k"``.
        lora_rank: LoRA rank r.
        lora_alpha: LoRA scale alpha (the update is scaled by alpha / r).
        lora_dropout: dropout on the LoRA input.
        lr: base learning rate (PH-Reg: 1e-4 for DINOv2, 3e-4 for CLIP).
        min_lr: learning rate at the end of the run (PH-Reg: 5e-6 DINOv2, 1e-5 CLIP).
        weight_decay: AdamW weight decay on matrices; tokens, position embeddings, norms and biases get none.
        patch_embed_lr_scale: the patch embedding's lr as a fraction of ``lr`` (the base lr on it wrecks the
            features within a few steps; docs/method.md).
        block_lr_scale: the blocks' lr as a fraction of ``lr`` (the registers, position embedding and norms get
            ``lr``): a block that already computes what the targets ask drifts under AdamW's full-size steps.
        schedule: ``exp`` (exponential decay from lr to min_lr over the run, PH-Reg) or ``cosine``; both per step.
        warmup_steps: linear warmup steps before the schedule.
        mse_weight: weight of the MSE term; the loss is (1 - cosine) + mse_weight * MSE per layer.
        loss_layers: block indices whose (final-normed) patch tokens also enter the loss, besides the output
            (negative ones count from the end; the last block is the output itself); ``auto``: the blocks where
            the artifacts build.
        artifact_blocks: the blocks where the artifacts build; None finds them on ``source_images`` training
            images (in the residual stream: :func:`retrofit.residual.residual_profile`).
        source_images: how many training images decide where the artifacts build and which units make them
            (one batch may hold too few artifacts); found once, kept in the checkpoint, reused on resume.
        register_neurons: the MLP units that make the artifacts (:mod:`retrofit.neurons`): ``auto`` finds them
            with the blocks where they build (units that fire at the artifact tokens and write along them), a path
            reads a ``retrofit neurons`` file (which also says where they build), None uses none.
        neuron_targets: the teacher runs with test-time registers on those units while making targets: its
            artifacts mostly never form, so most images need one teacher forward instead of shifted views.
        ablate_neurons: switch those units off in the student and keep them off (their ``fc2`` columns get no
            gradient): it starts where the targets are (they are made with the units switched off,
            ``targets.neurons``), so it only has to learn what they miss.
        targets: how denoised targets are made (views, shifts, outlier handling): :class:`TargetSettings`.
        cache_dir: store each image's targets here and reuse them (needs deterministic crops); None
            computes targets for every batch.
        seed: seeds the register init and the target views.
        grad_checkpointing: recompute the student's block activations in the backward instead of storing
            them (timm's own checkpointing): about a third less step memory for about 15% more compute
            (bench/README.md); for large models at high resolution on one GPU.
    """

    def __init__(
        self,
        backbone: str | nn.Module,
        checkpoint: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        num_registers: int = 4,
        register_init: RegisterInit = "mean_patch",
        freeze: FreezePreset = "auto",
        last_k: int = 1,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lr: float = 1e-4,
        min_lr: float = 5e-6,
        weight_decay: float = 1e-2,
        patch_embed_lr_scale: float = 0.01,
        block_lr_scale: float = 0.1,
        schedule: Schedule = "exp",
        warmup_steps: int = 0,
        mse_weight: float = 1.0,
        loss_layers: list[int] | Literal["auto"] | None = "auto",
        artifact_blocks: list[int] | None = None,
        source_images: int = 64,
        register_neurons: str | None = "auto",
        neuron_targets: bool = True,
        ablate_neurons: bool = True,
        targets: TargetSettings | dict[str, Any] | None = None,
        cache_dir: str | None = None,
        seed: int = 0,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        settings = _target_settings(targets)
        self.save_hyperparameters(ignore=["backbone", "targets"] if isinstance(backbone, nn.Module) else ["targets"])
        self.hparams["targets"] = asdict(settings)  # plain values: checkpoints load with weights_only=True
        self._check_settings()
        self.teacher = self._load_teacher(backbone, checkpoint, model_kwargs or {})
        self.source = weights_source(self.teacher)  # for the model card; kept in checkpoints
        self.student = self._build_student()
        self.artifact_source: RegisterNeurons | None = None  # where the artifacts build, their units: prepare()
        self.loss_layers: tuple[int, ...] = ()
        self.targets = DenoisedTargets(self.teacher, settings, seed=seed)
        self._settle(None)
        self.margin = 0  # patches of real pixels around the student's window; set from the data in setup()
        self._cache: TargetCache | None = None

    # ---- construction -----------------------------------------------------------------------------

    def _check_settings(self) -> None:
        h = self.hparams
        checks = (
            (h.lr > 0 and 0 < h.min_lr <= h.lr, f"need 0 < min_lr <= lr, got lr={h.lr}, min_lr={h.min_lr}"),
            (h.weight_decay >= 0, f"weight_decay must be >= 0, got {h.weight_decay}"),
            (h.patch_embed_lr_scale >= 0, f"patch_embed_lr_scale must be >= 0, got {h.patch_embed_lr_scale}"),
            (h.block_lr_scale >= 0, f"block_lr_scale must be >= 0, got {h.block_lr_scale}"),
            (h.schedule in ("exp", "cosine"), f"schedule must be 'exp' or 'cosine', got {h.schedule!r}"),
            (h.warmup_steps >= 0 and h.mse_weight >= 0, "warmup_steps and mse_weight must be >= 0"),
            (h.num_registers >= 0, f"num_registers must be >= 0, got {h.num_registers}"),
        )
        for ok, problem in checks:
            if not ok:
                raise RetrofitError(f"{problem}: fix the RetrofitModule setting.")

    @staticmethod
    def _load_teacher(backbone: str | nn.Module, checkpoint: str | None, model_kwargs: dict[str, Any]) -> nn.Module:
        if isinstance(backbone, nn.Module):
            check_supported(backbone)
            teacher = copy.deepcopy(backbone)
        else:
            teacher = load_backbone(backbone, checkpoint, **model_kwargs)
        return teacher.eval().requires_grad_(False)

    def _build_student(self) -> nn.Module:
        h = self.hparams
        vit = add_registers(self.teacher, h.num_registers, init=h.register_init, seed=h.seed).train()
        vit.set_grad_checkpointing(h.grad_checkpointing)
        if h.freeze == "lora":
            return _add_lora(vit, h.lora_rank, h.lora_alpha, h.lora_dropout, h.seed)  # freezes all but the adapters
        return vit

    def _apply_freeze(self) -> None:
        """requires_grad after the freeze preset (``auto``: on where the artifacts build, known from the data)."""
        h, vit = self.hparams, self.student_vit
        prefixes = trainable_prefixes(vit, h.freeze, h.last_k, self.artifact_blocks)
        for name, p in vit.named_parameters():
            if _starts(name, prefixes):
                p.requires_grad_(True)
            elif h.freeze != "lora":
                p.requires_grad_(False)

    @property
    def artifact_blocks(self) -> list[int]:
        """The blocks where the teacher's artifacts build: ``artifact_blocks`` as set, else as found (empty before
        :meth:`prepare` and for a model without artifacts)."""
        given = self.hparams.artifact_blocks
        if given is not None:
            return list(block_indices(self.teacher, given))
        return [] if self.artifact_source is None else self.artifact_source.blocks

    @property
    def neurons(self) -> RegisterNeurons | None:
        """The register neurons in use (None: none found, none wanted, or not settled yet)."""
        wanted = self.hparams.register_neurons is not None
        found = self.artifact_source
        return found if wanted and found is not None and found.count else None

    def _settle(self, source: RegisterNeurons | None) -> None:
        """Take ``source`` (what was found about the teacher's artifacts) as the run's: what trains, the loss layers
        and the targets' register neurons follow from it. The only place that changes them."""
        h = self.hparams
        self.artifact_source = source
        self._apply_freeze()
        layers = self.artifact_blocks if h.loss_layers == "auto" else (h.loss_layers or ())  # auto: where they build
        last = len(self.teacher.blocks) - 1  # the last block through the final norm is the output itself
        self.loss_layers = tuple(i for i in block_indices(self.teacher, layers) if i != last)
        self.targets.use(layers=self.loss_layers, neurons=self.neurons if h.neuron_targets else None)
        if h.ablate_neurons and self.neurons is not None:
            with torch.no_grad():
                for block, units in self.neurons.units.items():
                    self.student_vit.blocks[block].mlp.fc2.weight[:, units] = 0

    @property
    def student_vit(self) -> nn.Module:
        """The student as a timm model (inside the peft wrapper for LoRA; adapters act in place)."""
        return timm_model(self.student)

    def train(self, mode: bool = True) -> RetrofitModule:
        """Lightning switches every submodule to train mode at fit start; the teacher stays in eval."""
        super().train(mode)
        self.teacher.eval()
        return self

    # ---- data and targets -------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Tell a RetrofitDataModule the backbone's patch size, normalisation and the margin targets need, then
        :meth:`prepare` on ``source_images`` training images (a resumed run takes what its checkpoint found)."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "configure_for"):
            if self.hparams.cache_dir is not None and getattr(dm, "random_crop", False):
                raise RetrofitError(
                    "cache_dir stores one target per image, but the data crops at random: "
                    "set data.random_crop false (or drop cache_dir)."
                )
            grid = square_size(self.teacher, dm.img_size) // patch_size(self.teacher)[0]
            dm.configure_for(self.teacher, self.targets.margin_patches(grid))
            self.margin = dm.margin
        if stage == "fit" and self.trainer.ckpt_path is None:
            self.prepare(*self._source_images() if self.needs_images else (None, None))

    @property
    def needs_images(self) -> bool:
        """Whether :meth:`prepare` searches the teacher for its artifacts (where they build, register neurons)."""
        h = self.hparams
        wants_blocks = h.artifact_blocks is None and "auto" in (h.freeze, h.loss_layers)
        return h.register_neurons == "auto" or (wants_blocks and h.register_neurons is None)

    def prepare(self, images: Tensor | None = None, names: Sequence[str] | None = None) -> None:
        """Settle what depends on the teacher's artifacts, once: where they build and the register neurons that
        make them, found on ``images`` (what the student sees, normalised; ``names`` label them in the record) or
        read from the ``register_neurons`` file. Under a Trainer, rank 0's findings go to every rank. Called by
        :meth:`setup`; call it yourself when stepping the module without a Trainer."""
        h = self.hparams
        if self.needs_images and images is None:
            raise RetrofitError("this RetrofitModule finds where the artifacts build and the register neurons on "
                                "training images: fit it with a datamodule, or pass images to prepare().")
        source = None
        if images is not None:
            source = find_register_neurons(self.teacher, images, self.targets.settings.outlier_k, names=names)
        elif h.register_neurons not in (None, "auto"):
            source = RegisterNeurons.load(h.register_neurons)
        if self._trainer is not None:
            source = self.trainer.strategy.broadcast(source, src=0)
        self._settle(source)
        rank_zero_info(self.first_line())

    def first_line(self, resumed: bool = False) -> str:
        """The run's first line, wrapped at 80 columns: what it found about the teacher's artifacts (``resumed``: what
        its checkpoint says it found) and what will train."""
        h, source = self.hparams, self.artifact_source
        if source is None:
            seen = "No artifact search (the settings say where to train)"
        else:
            peak = max(source.profile.outliers, default=0.0) if source.profile else 0.0
            seen = (f"Artifact source ({len(source.images)} training images): up to {100 * peak:.2f}% high-norm "
                    f"outlier tokens in the residual stream, {source.describe()}")
        where = blocks_text(self.artifact_blocks)
        trains = {"auto": "the registers" + (f" and {where}" if where else "")}.get(h.freeze, f"freeze={h.freeze}")
        line = f"{'Resumed: ' if resumed else ''}{seen}{self._neuron_uses()}; training {trains}."
        return textwrap.fill(line, 79)  # whole words in an 80-column terminal

    def _neuron_uses(self) -> str:
        """What the run does with the register neurons, for :meth:`first_line`."""
        if self.neurons is None:
            return ""
        uses = []
        if self.hparams.neuron_targets:
            edit = self.targets.settings.neurons
            uses.append("switched off in the targets" if edit == "silence" else "moved to a test-time register "
                        "in the targets")
        if self.hparams.ablate_neurons:
            uses.append("kept off in the student")
        return f" ({', '.join(uses)})" if uses else ""

    def _source_images(self) -> tuple[Tensor, list[str]]:
        """``source_images`` images from the training data, as the student sees them, on the run's device."""
        want = self.hparams.source_images
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None:
            loader = dm.train_dataloader()
        else:  # a loader passed to fit() directly: Lightning 2.6 keeps it only in this private attribute
            loader = self.trainer.fit_loop._data_source.dataloader()
        images, names = [], []
        for batch in loader:
            images.append(batch["image"])
            names += [str(key) for key in batch["key"]]
            if len(names) >= want:
                break
        device = self.trainer.strategy.root_device
        self.teacher.to(device)  # Lightning moves the whole module there next anyway
        pixels = crop_center(torch.cat(images)[:want], self.margin * patch_size(self.teacher)[0])
        return pixels.to(device), names[:want]


    def batch_targets(self, images: Tensor, keys: Sequence[str]) -> Targets:
        """The targets of a training batch (from the target cache when there is one); override to make them
        another way (the benchmarks' naive PH-Reg loop does)."""
        if self.hparams.cache_dir is None:
            return self.targets(images, self.margin)
        if self._cache is None:
            size = images.shape[-1] - 2 * self.margin * patch_size(self.teacher)[0]
            self._cache = TargetCache(self.hparams.cache_dir, self.teacher, self.targets.settings, self.loss_layers,
                                      image_size=size, margin=self.margin, neurons=self.targets.neurons)
        return self._cache.get_or_compute(self.targets, images, keys)

    def forward(self, images: Tensor) -> Tensor:
        """The student's final patch features (B, H, W, D)."""
        return patch_features(self.student_vit, images)

    def _student_features(self, images: Tensor) -> list[Tensor]:
        """Final patch features, then one grid per loss layer - all from a single forward."""
        if not self.loss_layers:
            return [patch_features(self.student_vit, images)]
        last = len(self.student_vit.blocks) - 1  # the last block through the final norm is the output
        grids = patch_features(self.student_vit, images, layers=[*self.loss_layers, last])
        return [grids[-1], *grids[:-1]]

    # ---- training ---------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images = batch["image"]
        targets = self.batch_targets(images, batch["key"])
        center = crop_center(images, self.margin * patch_size(self.teacher)[0])
        preds = self._student_features(center)
        wanted = [targets.features, *(targets.layers[i] for i in self.loss_layers)]
        terms = [_loss_terms(pred, target) for pred, target in zip(preds, wanted, strict=True)]
        loss = torch.stack([(1 - cos) + self.hparams.mse_weight * mse for cos, mse in terms]).sum()
        outliers = outlier_mask(preds[0].detach(), self.targets.settings.outlier_k).float().mean()
        metrics = {"train/loss": loss, "train/cosine": terms[0][0], "train/outlier_fraction": outliers}
        self.log_dict(metrics, prog_bar=True, sync_dist=True, batch_size=len(images))
        return loss

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: timm's weight-decay split (none on the model's ``no_weight_decay()`` tokens and position
        embedding, norms and biases), each split again by lr: the patch embedding and the blocks at their scaled lr,
        the rest (registers, position embedding, norms) at ``lr``."""
        h, vit = self.hparams, self.student_vit
        scale = {id(p): h.patch_embed_lr_scale for p in vit.patch_embed.parameters()}
        scale |= {id(p): h.block_lr_scale for p in vit.blocks.parameters()}
        groups = []
        for group in param_groups_weight_decay(vit, h.weight_decay, no_weight_decay_list=vit.no_weight_decay()):
            for factor in sorted({scale.get(id(p), 1.0) for p in group["params"]}):
                params = [p for p in group["params"] if scale.get(id(p), 1.0) == factor]
                groups.append({**group, "params": params, "lr": h.lr * factor})
        return groups

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        total = self.trainer.estimated_stepping_batches
        if not any(p.requires_grad for p in self.student.parameters()):
            raise RetrofitError("nothing to train: no registers (num_registers=0) and no artifacts to repair with "
                                "freeze='auto': add registers or choose another freeze preset.")
        if not math.isfinite(total):
            raise RetrofitError("the run has no fixed length, so the lr schedule cannot be laid out: set max_steps.")
        optimizer = torch.optim.AdamW(self.param_groups(), lr=h.lr, betas=(0.9, 0.999))
        floor = h.min_lr / h.lr
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: _lr_factor(step, int(total), h.warmup_steps, h.schedule, floor)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints ------------------------------------------------------------------------------

    def _teacher_keys(self) -> Iterator[str]:
        return (f"teacher.{k}" for k in self.teacher.state_dict())

    def on_after_backward(self) -> None:
        """Keep the switched-off units off: their ``fc2`` columns get no gradient, so they stay exactly zero (AdamW
        moves a weight with no gradient, no moments and no value by nothing). Their activations at the artifact
        tokens are huge, so even the tiny gradient of a student that starts at its targets grew the artifacts
        back: AdamW's first steps are lr-sized whatever the gradient's size."""
        if self.hparams.ablate_neurons and self.neurons is not None:
            for block, units in self.neurons.units.items():
                grad = self.student_vit.blocks[block].mlp.fc2.weight.grad
                if grad is not None:
                    grad[:, units] = 0

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave the frozen teacher out (it is rebuilt from the backbone) and keep the view generator's state."""
        for key in self._teacher_keys():
            checkpoint["state_dict"].pop(key, None)
        checkpoint["target_rng_state"] = self.targets.get_rng_state()
        found = self.artifact_source
        checkpoint["artifact_source"] = None if found is None else found.to_dict()
        checkpoint["source"] = self.source

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
        self.source = checkpoint.get("source", {})  # the run's weights, not those of an architecture rebuilt to load it
        if "artifact_source" in checkpoint:  # what the run found, not what a new search would show
            found = checkpoint["artifact_source"]
            self._settle(None if found is None else RegisterNeurons.from_dict(found))
            rank_zero_info(self.first_line(resumed=True))
        if "target_rng_state" in checkpoint:
            self.targets.set_rng_state(checkpoint["target_rng_state"])

    # ---- export -----------------------------------------------------------------------------------

    def export_model(self) -> nn.Module:
        """A plain timm model with the registers (LoRA merged), a copy in eval mode."""
        student = copy.deepcopy(self.student)
        model = student.merge_and_unload() if isinstance(student, PeftModel) else student
        model.set_grad_checkpointing(False)  # a training-time choice, not part of the exported model
        return model.requires_grad_(True).eval()

    def export(
        self, out_dir: str | Path, overwrite: bool = False, model: nn.Module | None = None, **metadata: Any
    ) -> Path:
        """Write ``model`` (default: :meth:`export_model`) with :func:`retrofit.export` (atomic, timm-native).

        config.json records the backbone, where its weights came from, the freeze preset and the trainer's step;
        ``metadata`` overrides or adds to them (e.g. the step of a checkpoint exported outside a Trainer, and
        ``img_size``, the training resolution the export is built for).
        """
        backbone = self.hparams.get("backbone") or self.teacher.pretrained_cfg["architecture"]
        info = {"backbone": str(backbone), "source": self.source, "freeze": self.hparams.freeze,
                "step": int(self.global_step), **metadata}
        return export(model or self.export_model(), out_dir, overwrite=overwrite, **info)

    # ---- rebuilding -------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str | Path, backbone: str | None = None) -> tuple[RetrofitModule, dict[str, Any]]:
        """The trained module of a ``retrofit fit`` checkpoint, rebuilt offline, and the checkpoint's record of
        the run: everything in it but the weights and optimizer states (``global_step``, the callbacks' states).

        The checkpoint is read weights-only (no code in it runs). The teacher is only an architecture here
        (no download): the checkpoint holds every student weight. ``backbone`` names the architecture when
        the run was started from an in-memory model (Python API).
        """
        path = Path(path)
        if not path.is_file():
            raise RetrofitError(f"checkpoint {path} does not exist: pass a .ckpt written by retrofit fit "
                                "(<log_dir>/checkpoints).")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise RetrofitError(f"{path} is not a readable Lightning checkpoint ({type(e).__name__}): "
                                "pass a .ckpt written by retrofit fit.") from e
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
            raise RetrofitError(f"{path} has no state_dict and hyper_parameters: pass a .ckpt written by retrofit fit.")
        hp = ckpt["hyper_parameters"]
        spec = backbone or hp.get("backbone")
        if not isinstance(spec, str):
            raise RetrofitError(f"{path} does not name its backbone (trained from a Python model): "
                                "pass --backbone NAME.")
        architecture = load_backbone(spec, pretrained=False, **(hp.get("model_kwargs") or {}))
        try:
            module = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True, backbone=architecture)
        except RuntimeError as e:  # load_state_dict's size mismatch / missing keys
            raise RetrofitError(
                f"{path} does not fit a {spec} student with these settings ({first_line(e, 120)}): "
                "pass the --backbone it was trained from."
            ) from e
        module.hparams["backbone"] = spec  # the export records where it came from
        return module, {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer_states")}
