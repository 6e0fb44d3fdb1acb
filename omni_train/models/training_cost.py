"""What one training step of a denoiser costs, counted on the meta device for any backbone
family: parameters per fine-tuning mode, model FLOPs and the activation bytes autograd keeps.

The denoiser is built on the meta device (shapes, no storage) with the fine-tuning mode
applied (omni_train/models/finetune.py), and one sample's forward and backward run on meta
tensors under torch's FlopCounterMode and saved-tensor hooks. Nothing is allocated, so a 14B
model at 480x832 and 81 frames is counted in seconds on any machine.

FLOPs are model FLOPs as in flops.py (matmuls, convolutions, attention; 2 per multiply-add) of
what autograd runs. Backward therefore follows this rule per op: the input gradient is
computed when some trainable parameter lies upstream of the op's input (as much work as the
forward op for a matmul), and the weight gradient when the op's own weight trains (as much
again); attention has no weights and costs 2x its forward whenever its inputs need gradients.
So full fine-tuning costs ~3x the forward (less where layers are fed by data, whose input
gradient is not needed). With a frozen base (new_modules, lora) the base's weight gradients
go, but activation gradients still flow back through every base layer that has a trainable
module upstream: in every family here the pose embedding joins the frame tokens before the
first block and audio cross-attention sits in every block, so that is the whole base. Its
linear layers then cost 1x their forward in backward (2x in all, not 3x) while its attention
keeps 2x (3x in all); new modules and LoRA adapters (rank x (in + out) per target linear) cost
their usual 2x. At 480x832 and 81 frames a frozen-base step is 2.6-2.75x the forward, not 3x:
attention and the new modules (audio cross-attention in every block, the pose guider at pixel
resolution) are a large share. Gradient checkpointing's recompute is not model work and is
left out.

Activations are the bytes of the tensors autograd saves for backward (parameters excluded),
deduplicated by storage, in the plan's dtype. Attention is run as a fused kernel (it saves
q, k, v, output and log-sum-exp, as flash-attn and the CUDA SDPA kernels do), not the math
kernel, which is all meta tensors take and would save the queries x keys probabilities. With
gradient checkpointing the forward keeps what autograd saves outside the checkpointed blocks
plus each checkpointed block's inputs (counted by a second pass with checkpointing on), and
the backward recomputes one block at a time, adding that block's saved tensors (the mean over
checkpointed blocks).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from omni_train.contracts import CONDITIONS, SPATIAL_STRIDE
from omni_train.models.config import ModelConfig
from omni_train.models.finetune import FINETUNE_MODES, apply_finetune_mode
from omni_train.models.flops import token_counts, train_flops_per_sample
from omni_train.models.sequence_parallel import (
    ExchangeCount,
    SequenceParallel,
    counting_exchanges,
)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class ParameterCounts:
    """Denoiser parameters: the base, the new (omni-condition) modules and, at ``lora_rank``,
    the LoRA adapters of the target linears; ``numels`` lists each tensor's size per part (the
    ZeRO-3 planner needs them: DeepSpeed keeps tensors below a threshold whole on every rank)."""

    base: int
    new_modules: int
    lora_adapters: int
    lora_rank: int
    numels: dict[str, tuple[int, ...]]
    # Parameters of the largest single module (its own, not its children's): what ZeRO-3
    # gathers at once to run it.
    largest_module: int

    @property
    def total(self) -> int:
        return self.base + self.new_modules

    def trainable(self, mode: str) -> int:
        """Parameters that train: all (full), the new modules (new_modules), or the new
        modules and the adapters (lora)."""
        return sum(sum(self.numels[part]) for part in trained_parts(mode))

    def frozen(self, mode: str) -> int:
        return self.base if mode != "full" else 0


def trained_parts(mode: str) -> tuple[str, ...]:
    if mode not in FINETUNE_MODES:
        raise ValueError(f"finetune mode={mode!r} is not one of {FINETUNE_MODES}")
    return {"full": ("base", "new_modules"), "new_modules": ("new_modules",)}.get(
        mode, ("new_modules", "lora_adapters")
    )


def lora_target_linears(denoiser: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear modules whose name fully matches the denoiser's lora_target_modules."""
    pattern = re.compile(denoiser.lora_target_modules)
    return [
        (name, module)
        for name, module in denoiser.named_modules()
        if isinstance(module, nn.Linear) and pattern.fullmatch(name)
    ]


def parameter_counts(denoiser: nn.Module, lora_rank: int) -> ParameterCounts:
    """Counts of a built (meta or real) denoiser without adapters."""
    if lora_rank < 1:
        raise ValueError(f"lora_rank={lora_rank}: use 1 or more (e.g. 16)")
    prefixes = tuple(denoiser.new_module_prefixes)
    base, new = [], []
    for name, param in denoiser.named_parameters():
        (new if name.startswith(prefixes) else base).append(param.numel())
    adapters = []
    for _, linear in lora_target_linears(denoiser):
        adapters += [lora_rank * linear.in_features, linear.out_features * lora_rank]
    largest = max(
        sum(p.numel() for p in module.parameters(recurse=False)) for module in denoiser.modules()
    )
    return ParameterCounts(
        base=sum(base),
        new_modules=sum(new),
        lora_adapters=sum(adapters),
        lora_rank=lora_rank,
        numels={"base": tuple(base), "new_modules": tuple(new), "lora_adapters": tuple(adapters)},
        largest_module=largest,
    )


def build_on_meta(cfg: ModelConfig, checkpointing: bool | None = None) -> nn.Module:
    """The denoiser of ``cfg`` with shapes and no storage (``checkpointing`` overrides
    model.dit.gradient_checkpointing). A family's base is built at random init from its
    configured shapes: a pretrained directory is not read."""
    from omni_train.models.denoiser import build_denoiser

    dit = cfg.dit
    if checkpointing is not None:
        dit = replace(dit, gradient_checkpointing=checkpointing)
    shapes_only = replace(cfg, dit=dit, backbone=_shapes_only_backbone(cfg))
    with torch.device("meta"):
        return build_denoiser(shapes_only)


def _shapes_only_backbone(cfg: ModelConfig):
    backbone = cfg.backbone
    if not backbone.pretrained:
        return backbone
    if not backbone.family:
        return replace(backbone, pretrained="")
    from omni_train.models.foundation_backbone import transformer_directory

    directory, subfolder = transformer_directory(backbone.pretrained)
    config_file = directory / (subfolder or "") / "config.json"
    saved = json.loads(config_file.read_text())
    shapes = {key: value for key, value in saved.items() if not key.startswith("_")}
    return replace(backbone, pretrained="", diffusers_config=shapes)


def denoiser_inputs(
    cfg: ModelConfig,
    resolution: Sequence[int],
    num_frames: int,
    text_tokens: int | None = None,
    batch: int = 1,
    device: str | torch.device = "meta",
) -> dict[str, Any]:
    """Keyword arguments of one forward of the denoiser (every condition on), as the trainer
    gives them: fp32 latents, caption embeddings, audio features and pose heatmaps."""
    counts = token_counts(cfg, resolution, num_frames, text_tokens)
    height, width = (int(v) for v in resolution)
    latent = (height // SPATIAL_STRIDE, width // SPATIAL_STRIDE)
    channels = cfg.vae.latent_channels
    on = torch.ones(batch, dtype=torch.bool, device=device)
    return {
        "noisy": torch.zeros(batch, channels, counts.latent_frames, *latent, device=device),
        "timesteps": torch.full((batch,), 0.5, device=device),
        "text": torch.zeros(batch, counts.text_tokens, cfg.text_encoder.d_model, device=device),
        "text_mask": torch.ones(batch, counts.text_tokens, dtype=torch.bool, device=device),
        "ref_latents": torch.zeros(batch, channels, 1, *latent, device=device),
        "audio_features": torch.zeros(
            batch, num_frames, cfg.audio_encoder.feature_dim, device=device
        ),
        "pose_heatmaps": torch.zeros(
            batch, cfg.pose_guider.num_keypoints, num_frames, height, width, device=device
        ),
        "active": {name: on for name in CONDITIONS},
    }


class MetaPass(TorchFunctionMode):
    """What a forward on meta tensors needs beyond shapes.

    - F.scaled_dot_product_attention runs as the memory-efficient fused kernel: it saves what
      flash-attn saves for backward, not the math kernel's probabilities.
    - A boolean a model branches on (``if ref_on.all()``) has no value on meta: the inputs
      turn every condition on and mask no key, so such a question about them is answered yes.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _fused_attention(*args, **kwargs)
        if func in (torch.Tensor.__bool__, torch.Tensor.item) and _is_meta_flag(args[0]):
            return True
        return func(*args, **kwargs)


def _is_meta_flag(tensor: torch.Tensor) -> bool:
    return tensor.is_meta and tensor.dtype == torch.bool and tensor.numel() == 1


def _fused_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    if query.dim() != 4:
        raise ValueError(f"attention over {query.dim()}-d queries: expected (B, heads, L, D)")
    if enable_gqa and key.shape[1] != query.shape[1]:
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
            bias = bias.masked_fill(~attn_mask, float("-inf"))
        else:
            bias = attn_mask.to(query.dtype)
        bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    out, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, True, dropout_p, is_causal, scale=scale
    )
    return out


def _attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    """Model FLOPs of attention's backward: 2x the forward (dq, dk, dv and dp); torch counts the
    fused kernel's recomputed scores too, which is not model work."""
    return 2 * sdpa_flop_count(query, key, value)


class SavedBytes:
    """Saved-tensor hooks summing the bytes of every storage autograd saves, once each."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.storages: dict[int, torch.UntypedStorage] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        # Holding the storage keeps its address from being reused by a later one.
        if storage._cdata not in self.exclude:
            self.storages.setdefault(storage._cdata, storage)
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @property
    def total(self) -> int:
        return sum(storage.nbytes() for storage in self.storages.values())


@dataclass(frozen=True)
class PassCount:
    forward_flops: int
    train_flops: int
    saved_bytes: int
    # Bytes this rank sends to the other sequence-parallel ranks: in all, in the forward, in
    # the forwards of the ``recomputed`` modules; and the largest single exchange.
    sent_bytes: int = 0
    forward_sent_bytes: int = 0
    recomputed_sent_bytes: int = 0
    largest_exchange_bytes: int = 0


def count_training_pass(
    denoiser: nn.Module,
    inputs: dict[str, Any],
    backward: bool = True,
    sequence_parallel: SequenceParallel | None = None,
    recomputed: Sequence[nn.Module] = (),
) -> PassCount:
    """FLOPs of one forward and of the backward autograd runs for the parameters that require
    grad, and the bytes the forward saves for backward (without ``backward``: the bytes only,
    no FLOPs). With ``sequence_parallel`` (a rank of a group without a process group: the
    tensors are meta), one rank's share: its frames, its heads, the bytes it sends, and of
    those the bytes sent inside the forwards of the ``recomputed`` modules."""
    with counting_exchanges() as exchanges, _counting_inside(recomputed, exchanges) as inside:
        return _count_pass(denoiser, inputs, backward, sequence_parallel, exchanges, inside)


@contextmanager
def _counting_inside(modules: Sequence[nn.Module], exchanges: ExchangeCount) -> Iterator[list[int]]:
    """Bytes ``exchanges`` counts during each forward of the modules (blocks: never nested)."""
    inside: list[int] = []

    def enter(*_: Any) -> None:
        inside.append(-exchanges.sent_bytes)

    def leave(*_: Any) -> None:
        inside[-1] += exchanges.sent_bytes

    handles = []
    for module in modules:
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield inside
    finally:
        for handle in handles:
            handle.remove()


def _count_pass(
    denoiser: nn.Module,
    inputs: dict[str, Any],
    backward: bool,
    sequence_parallel: SequenceParallel | None,
    exchanges: ExchangeCount,
    inside: list[int],
) -> PassCount:
    parameters = {p.untyped_storage()._cdata for p in denoiser.parameters()}
    saved = SavedBytes(parameters)
    backward_op = torch.ops.aten._scaled_dot_product_efficient_attention_backward
    mapping = {backward_op: _attention_backward_flops}
    if sequence_parallel is not None:
        inputs = {**inputs, "sequence_parallel": sequence_parallel}
    hooks = torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack)
    if not backward:
        with MetaPass(), hooks:
            denoiser(**inputs)
        return PassCount(
            0, 0, saved.total, exchanges.sent_bytes, sum(inside), exchanges.largest_bytes
        )
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, MetaPass():
        with hooks:
            out = denoiser(**inputs)
        forward, forward_sent = counter.get_total_flops(), exchanges.sent_bytes
        if out.requires_grad:
            out.float().square().mean().backward()
    return PassCount(
        forward,
        counter.get_total_flops(),
        saved.total,
        exchanges.sent_bytes,
        forward_sent,
        sum(inside),
        exchanges.largest_bytes,
    )


def checkpointed_block_count(denoiser: nn.Module) -> int:
    """Blocks the denoiser recomputes in backward: this project's MMDiT names them; a family
    runs each base block with its audio cross-attention in one checkpoint."""
    backbone = getattr(denoiser, "backbone", None)
    if backbone is not None:
        return len(backbone.checkpointed_blocks())
    return len(denoiser.audio_attn) if denoiser.gradient_checkpointing else 0


def recomputed_blocks(denoiser: nn.Module) -> list[nn.Module]:
    """The blocks gradient checkpointing (model.dit.gradient_checkpointing) recomputes in
    backward, in a denoiser built with or without it: this project's MMDiT's every
    checkpoint_every_n_blocks-th block. Empty for a family, which recomputes every base
    block, where all its exchanges are (it calls their parts, not the blocks: no hook on a
    block would see them)."""
    backbone = getattr(denoiser, "backbone", None)
    if backbone is None:
        return []
    return list(backbone.blocks)[:: backbone.checkpoint_every_n_blocks]


# The config keys that set how many blocks of each kind a family repeats (the own MMDiT's
# model.dit.depth; a family's diffusers config).
BLOCK_KEYS: dict[str, tuple[str, ...]] = {
    "": ("depth",),
    "wan": ("num_layers",),
    "hunyuan_video": ("num_layers", "num_single_layers"),
}


def block_counts(cfg: ModelConfig, denoiser: nn.Module) -> dict[str, int]:
    keys = BLOCK_KEYS[cfg.backbone.family]
    if not cfg.backbone.family:
        return {"depth": cfg.dit.depth}
    return {key: int(denoiser.base.config[key]) for key in keys}


def with_block_counts(cfg: ModelConfig, counts: dict[str, int]) -> ModelConfig:
    if not cfg.backbone.family:
        return replace(cfg, dit=replace(cfg.dit, depth=counts["depth"]))
    shapes = {**cfg.backbone.diffusers_config, **counts}
    return replace(cfg, backbone=replace(cfg.backbone, diffusers_config=shapes))


@dataclass(frozen=True)
class TrainingCost:
    """One sample's training step, for one fine-tuning mode."""

    mode: str
    params: ParameterCounts
    forward_flops: int
    train_flops: int
    # Bytes saved for backward without checkpointing.
    saved_bytes: int
    # Peak activation bytes with the model's checkpointing (= saved_bytes without it).
    activation_bytes: int
    # Sequence-parallel ranks sharing the sample (1 = none). Above 1 every figure is the
    # busiest rank's (the first: it holds the extra frame of an uneven split).
    sequence_parallel: int = 1
    # Bytes that rank sends to the others in the step (all-to-alls and all-gathers), and the
    # send buffer of its largest exchange.
    sent_bytes: int = 0
    largest_exchange_bytes: int = 0


LARGEST = 5  # the index of the largest exchange in _pass_figures' list


def _pass_figures(
    cfg: ModelConfig,
    inputs: dict[str, Any],
    mode: str,
    lora_rank: int,
    dtype: torch.dtype,
    sequence_parallel: int = 1,
) -> list[int]:
    """[forward FLOPs, train FLOPs, saved bytes, bytes kept with checkpointing, bytes sent,
    blocks checkpointed] of one model size (one rank's, with ``sequence_parallel`` > 1)."""
    sp = SequenceParallel(None, 0, sequence_parallel) if sequence_parallel > 1 else None

    def built(checkpointing: bool) -> nn.Module:
        denoiser = apply_finetune_mode(build_on_meta(cfg, checkpointing), mode, lora_rank)
        return denoiser.to(dtype).train()

    plain_model = built(False)
    blocks = checkpointed_block_count(build_on_meta(cfg))
    recomputed = recomputed_blocks(plain_model)
    plain = count_training_pass(plain_model, inputs, sequence_parallel=sp, recomputed=recomputed)
    kept = plain.saved_bytes
    if blocks:
        kept = count_training_pass(built(True), inputs, False, sp).saved_bytes
    # A recomputed block sends its forward's exchanges again in backward.
    resent = plain.recomputed_sent_bytes if recomputed else plain.forward_sent_bytes
    sent = plain.sent_bytes + (resent if blocks else 0)
    return [
        plain.forward_flops,
        plain.train_flops,
        plain.saved_bytes,
        kept,
        sent,
        plain.largest_exchange_bytes,
        blocks,
    ]


def _count(
    cfg: ModelConfig,
    resolution: Sequence[int],
    num_frames: int,
    text_tokens: int | None,
    mode: str,
    lora_rank: int,
    precision: str,
    sequence_parallel: int = 1,
) -> TrainingCost:
    """Blocks of a kind cost the same, so every figure is linear in the block counts: it is
    counted at a small depth and at one step more of each kind, then extrapolated (equal to
    the count at full depth, tested). The own MMDiT steps by checkpoint_every_n_blocks, the
    period of its checkpointing."""
    denoiser = build_on_meta(cfg, False)
    params = parameter_counts(denoiser, lora_rank)
    inputs = denoiser_inputs(cfg, resolution, num_frames, text_tokens)
    dtype = DTYPES[precision]
    counts = block_counts(cfg, denoiser)
    # The own MMDiT's last block differs (its text stream ends there), so it starts at 2.
    step = cfg.dit.checkpoint_every_n_blocks if not cfg.backbone.family else 1
    start = step * (1 if cfg.backbone.family else 2)
    small = dict.fromkeys(counts, start)
    spec = (inputs, mode, lora_rank, dtype, sequence_parallel)
    if any(n <= start + step or (n - start) % step for n in counts.values()):
        figures = _pass_figures(cfg, *spec)
    else:
        base = _pass_figures(with_block_counts(cfg, small), *spec)
        figures = list(base)
        for key, n in counts.items():
            grown = _pass_figures(with_block_counts(cfg, {**small, key: start + step}), *spec)
            for i, (more, less) in enumerate(zip(grown, base, strict=True)):
                if i != LARGEST:  # one exchange's size does not grow with depth
                    figures[i] += (more - less) * (n - start) // step
    forward, train, saved, kept, sent, largest, blocks = figures
    activations = kept + max(0, saved - kept) // blocks if blocks else saved
    return TrainingCost(
        mode, params, forward, train, saved, activations, sequence_parallel, sent, largest
    )


_COSTS: dict[tuple, TrainingCost] = {}


def default_lora_rank() -> int:
    """trainer.finetune.lora_rank's default."""
    from omni_train.trainer.config import FinetuneConfig

    return FinetuneConfig().lora_rank


def training_cost(
    cfg: ModelConfig,
    resolution: Sequence[int],
    num_frames: int,
    text_tokens: int | None = None,
    mode: str = "full",
    lora_rank: int | None = None,
    precision: str = "bf16",
    sequence_parallel: int = 1,
) -> TrainingCost:
    """The cost of one sample of ``num_frames`` pixel frames at ``resolution`` (height, width)
    with ``text_tokens`` padded caption tokens (default model.text_encoder.max_length), for
    ``mode`` (full | new_modules | lora at ``lora_rank``, default trainer.finetune's) at
    ``precision`` (bf16 | fp32: the dtype of the weights and activations), on one rank of
    ``sequence_parallel`` sharing the sample (trainer.sequence_parallel; its busiest rank)."""
    trained_parts(mode)
    if precision not in DTYPES:
        raise ValueError(f"precision={precision!r}: use one of {', '.join(DTYPES)}")
    counts = token_counts(cfg, resolution, num_frames, text_tokens)  # names a bad shape first
    if sequence_parallel < 1:
        raise ValueError(f"sequence_parallel={sequence_parallel}: use 1 (off) or more ranks")
    if sequence_parallel > counts.latent_frames:
        SequenceParallel(None, 0, sequence_parallel).shard_frames(counts.latent_frames, 1)
    rank = default_lora_rank() if lora_rank is None else int(lora_rank)
    shape = (tuple(int(v) for v in resolution), int(num_frames), text_tokens)
    key = (json.dumps(asdict(cfg), sort_keys=True), *shape, mode, rank, precision)
    key += (sequence_parallel,)
    if key not in _COSTS:
        _COSTS[key] = _count(cfg, *shape, mode, rank, precision, sequence_parallel)
    return _COSTS[key]


# Caption lengths the counted FLOPs are sampled at: they are a polynomial of degree 2 in the
# caption length (linear layers over text tokens, attention over text and video tokens), so
# three counts give every length exactly.
SAMPLED_TEXT_TOKENS = (1, 2, 3)


def train_flops_per_sample_of(
    model_cfg: ModelConfig,
    resolution: Sequence[int],
    num_frames: int,
    text_tokens: int | None = None,
    mode: str = "full",
    lora_rank: int | None = None,
) -> int:
    """Training FLOPs per sample for MFU: this project's MMDiT trained in full keeps the
    closed form of flops.py (equal to the count, tested); every other case is counted, at
    three caption lengths once per model, clip and mode (interpolated exactly in between)."""
    if not model_cfg.backbone.family and mode == "full":
        return train_flops_per_sample(model_cfg, resolution, num_frames, text_tokens)
    length = model_cfg.text_encoder.max_length if text_tokens is None else int(text_tokens)
    plain = replace(model_cfg, dit=replace(model_cfg.dit, gradient_checkpointing=False))
    f1, f2, f3 = (
        training_cost(plain, resolution, num_frames, t, mode, lora_rank, "fp32").train_flops
        for t in SAMPLED_TEXT_TOKENS
    )
    return f1 + (length - 1) * (f2 - f1) + (length - 1) * (length - 2) // 2 * (f3 - 2 * f2 + f1)
