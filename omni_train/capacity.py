"""Capacity planner: memory per GPU per ZeRO stage, step time at an assumed MFU, GPU-days
per curriculum stage, for a model preset (any backbone family, any fine-tuning mode) on a
given corpus and cluster; and a table of memory per GPU across presets, modes and ZeRO setups.

    python -m omni_train.capacity model=wan21_14b finetune.mode=lora resolution=[480,832] \\
        num_frames=81 gpu=H100 num_gpus=8 [offload_optimizer=cpu] [offload_param=cpu]
    python -m omni_train.capacity table=true        # the VRAM table (presets x modes x ZeRO)
    python -m omni_train.capacity model=wan21_14b sequence_parallel=4 num_gpus=8
    python -m omni_train.capacity longest=true      # longest clip per GPU per preset x SP size

Parameters, FLOPs and activations come from the denoiser itself, built on the meta device
(omni_train/models/training_cost.py); the memory model is ``memory_per_gpu`` below.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from omni_train.curriculum.config import CurriculumConfig
from omni_train.models.config import ModelConfig
from omni_train.models.training_cost import ParameterCounts, TrainingCost, trained_parts
from omni_train.trainer.config import FinetuneConfig
from omni_train.trainer.throughput import gpu_peak, peak_for_precision

log = logging.getLogger("omni_train.capacity")
GIB = 2**30
# Memory (GiB) of the GPUs the planner knows; their peaks are the table MFU is measured
# against (omni_train.trainer.throughput.GPU_PEAKS), at the plan's precision.
GPU_MEMORY_GB: dict[str, float] = {
    "A100-40GB": 40.0,
    "A100": 80.0,
    "H100": 80.0,  # SXM
    "H100 PCIe": 80.0,
    "H100 NVL": 94.0,
    "H200": 141.0,
}
# Per-direction NVLink bandwidth of each GPU to its node's other GPUs (GB/s; NVIDIA's
# figures: NVLink 4 900 GB/s and NVLink 3 600 GB/s both directions), and PCIe Gen5 x16 for
# the PCIe cards (an NVL pair's bridge links two GPUs only). The sequence-parallel exchanges
# of a group within a node go over it.
GPU_LINK_GB_S: dict[str, float] = {
    "A100-40GB": 300.0,
    "A100": 300.0,
    "H100": 450.0,
    "H100 PCIe": 64.0,
    "H100 NVL": 64.0,
    "H200": 450.0,
}
# A plan fits when it needs less than this share of the GPU's memory: the rest is the CUDA
# context, NCCL's buffers and the caching allocator's fragmentation.
USABLE_SHARE = 0.9
OFFLOAD_DEVICES = ("none", "cpu")
# DeepSpeed's defaults, which the trainer's DeepSpeed config (trainer/ds_config.py) keeps:
# gradients reduced per bucket of this many elements, ZeRO-3 prefetching this many parameter
# elements ahead, and keeping tensors under this many elements whole on every rank.
REDUCE_BUCKET_ELEMENTS = 500_000_000
PREFETCH_BUCKET_ELEMENTS = 50_000_000
PERSISTENCE_THRESHOLD = 100_000
# The VRAM table's rows (table=true): presets x fine-tuning modes x (ZeRO stage, offload).
TABLE_MODELS = ("hunyuan_video_13b", "wan21_1_3b", "wan21_14b", "4b", "7b")
TABLE_SETUPS = ((2, "none"), (2, "cpu"), (3, "none"), (3, "cpu"))


@dataclass
class CapacityConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    # Which parameters train and the LoRA rank (trainer.finetune's fields and defaults).
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    resolution: list[int] = field(default_factory=lambda: [512, 512])
    num_frames: int = 97
    # Padded caption tokens per sample; 0 = model.text_encoder.max_length.
    text_tokens: int = 0
    fps: float = 25.0
    corpus_hours: float = 18_700.0
    gpu: str = "H100"
    num_gpus: int = 64
    micro_batch: int = 1
    grad_accum: int = 1
    precision: str = "bf16"
    # As trainer.offload_optimizer / trainer.offload_param: "none" or "cpu" (ZeRO-Offload).
    offload_optimizer: str = "none"
    offload_param: str = "none"
    mfu: float = 0.35
    # Ranks sharing each sample (trainer.sequence_parallel): each holds 1/N of the latent
    # frames; world = data-parallel size x sequence_parallel.
    sequence_parallel: int = 1
    # GPUs per node: a sequence-parallel group larger than this exchanges across nodes.
    gpus_per_node: int = 8
    # GB/s per GPU, one direction: within a node (0 = the GPU's NVLink or PCIe figure in
    # GPU_LINK_GB_S) and between nodes (one 400 Gb/s NIC per GPU); the exchanges are assumed
    # to reach this share of them.
    intra_node_gb_s: float = 0.0
    inter_node_gb_s: float = 50.0
    link_efficiency: float = 0.7
    # Total optimizer steps; each curriculum stage runs from its start_step to the next one's.
    max_steps: int = 100_000
    # Print the VRAM table of table_models (each x full / new_modules / lora x ZeRO 2, 3 x
    # offload none, cpu) at this config's clip, precision, micro batch, GPU and num_gpus.
    table: bool = False
    table_models: list[str] = field(default_factory=lambda: list(TABLE_MODELS))
    # Print the longest clip (in frames at this resolution) one GPU trains, for each of
    # table_models x longest_modes x longest_sp_sizes, at ZeRO stage longest_zero_stage with
    # this config's offload, precision, micro batch, GPU and num_gpus.
    longest: bool = False
    longest_modes: list[str] = field(default_factory=lambda: ["full", "lora"])
    longest_sp_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    longest_zero_stage: int = 3


def bytes_per_param(precision: str, zero_stage: int) -> tuple[int, int, int]:
    """(weight, gradient, optimizer) bytes per trainable parameter with AdamW.

    bf16: 2 + 2, and the optimizer's fp32 master copy plus two moments, 4 + 8. fp32: 4 + 4,
    and the moments (8) on the parameters themselves, except that DeepSpeed's ZeRO-1/2
    optimizer clones its partition of the weights as the master even when they are fp32
    (12, as measured; ZeRO-3 steps its fp32 partitions in place).
    """
    if precision == "bf16":
        return 2, 2, 12
    if precision == "fp32":
        return 4, 4, 12 if zero_stage in (1, 2) else 8
    raise ValueError(f"precision={precision!r}: use 'bf16' or 'fp32'")


def model_state_bytes(
    trainable: int,
    zero_stage: int,
    ranks: int,
    precision: str,
    frozen: int = 0,
    persistent: tuple[int, int] = (0, 0),
    offload_optimizer: str = "none",
    offload_param: str = "none",
) -> dict[str, float]:
    """Bytes per rank of the weights, gradients and optimizer state that stay resident, on
    the GPU and on the host, for ``trainable`` parameters (and ``frozen`` ones, weights only).

    ZeRO-1 partitions the optimizer state over the ``ranks``; DeepSpeed reduces each
    gradient into its owner's partition at the end of backward from ZeRO-1 on (the full
    gradients of ZeRO-1 and the buckets of ZeRO-2/3 are in ``transient_bytes``); ZeRO-3 also
    partitions the weights, frozen ones included, except ``persistent`` = (trainable, frozen)
    parameters in tensors below DeepSpeed's persistence threshold, which every rank keeps
    whole besides its partition. Frozen weights are stored like trainable ones (the engine
    casts the whole module to bf16). Optimizer offload moves the optimizer state, and from
    ZeRO-2 on the gradient partitions, to host memory; parameter offload (ZeRO-3) moves the
    weight partitions there.
    """
    weight, grad, optim = bytes_per_param(precision, zero_stage)
    for name, device in (
        ("offload_optimizer", offload_optimizer),
        ("offload_param", offload_param),
    ):
        if device not in OFFLOAD_DEVICES:
            raise ValueError(f"{name}={device!r}: use one of {', '.join(OFFLOAD_DEVICES)}")
    if offload_optimizer != "none" and zero_stage == 0:
        raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
    if offload_param != "none" and zero_stage != 3:
        raise ValueError("offload_param needs zero_stage 3 (only ZeRO-3 partitions parameters)")
    weights = weight * (trainable + frozen)
    gradients = grad * trainable
    optimizer = optim * trainable
    if zero_stage >= 1:
        optimizer /= ranks
        gradients /= ranks
    whole = 0.0
    if zero_stage >= 3:
        whole = weight * sum(persistent)
        weights /= ranks
    host = {"weights": 0.0, "gradients": 0.0, "optimizer": 0.0}
    if offload_optimizer != "none":
        host["optimizer"], optimizer = optimizer, 0.0
        if zero_stage >= 2:
            host["gradients"], gradients = gradients, 0.0
    if offload_param != "none":
        host["weights"], weights = weights, 0.0
    return {
        "weights": weights + whole,
        "gradients": gradients,
        "optimizer": optimizer,
        "host": sum(host.values()),
    }


def transient_bytes(
    trainable: int, largest_module: int, zero_stage: int, ranks: int, precision: str
) -> float:
    """Memory that comes and goes within a step, at its peak (an estimate from DeepSpeed's
    defaults): ZeRO-1's full gradients before their reduction (ZeRO-0 holds them anyway);
    ZeRO-2's reduce bucket; ZeRO-3's reduce bucket plus the gathered weights of the running
    module and the prefetched ones."""
    weight, grad, _ = bytes_per_param(precision, zero_stage)
    bucket = grad * min(trainable, REDUCE_BUCKET_ELEMENTS)
    if zero_stage == 0:
        return 0.0
    if zero_stage == 1:
        return grad * trainable * (1 - 1 / ranks)
    if zero_stage == 2:
        return bucket
    return bucket + weight * (largest_module + PREFETCH_BUCKET_ELEMENTS)


def persistent_params(params: ParameterCounts, mode: str) -> tuple[int, int]:
    """(trainable, frozen) parameters in tensors ZeRO-3 keeps whole on every rank."""
    trained = trained_parts(mode)
    small = {
        part: sum(n for n in numels if n < PERSISTENCE_THRESHOLD)
        for part, numels in params.numels.items()
    }
    frozen = small["base"] if "base" not in trained else 0
    return sum(small[part] for part in trained), frozen


def exchange_buffer_bytes(cost: TrainingCost) -> float:
    """Sequence parallelism's transient buffers at the largest exchange: the stacked q/k/v,
    their flat send copy and the receive buffer (the gathered result is an activation)."""
    return 3.0 * cost.largest_exchange_bytes


def memory_per_gpu(
    cost: TrainingCost,
    encoder_params: int,
    zero_stage: int,
    ranks: int,
    precision: str,
    micro_batch: int,
    offload_optimizer: str = "none",
    offload_param: str = "none",
) -> dict[str, float]:
    """Bytes per GPU (and offloaded bytes per rank on the host) of one training setup.

    Model states: ``model_state_bytes`` for the mode's trainable and frozen parameters.
    Activations: what the denoiser keeps for backward per sample (counted, with the preset's
    gradient checkpointing) x micro batch; with sequence parallelism, what its busiest rank
    keeps. Encoders: the frozen VAE, text and audio encoders, which the trainer keeps on
    every GPU in the run's precision (trainer.frozen_dtype=auto). Transient: see
    ``transient_bytes`` and ``exchange_buffer_bytes``. ZeRO partitions over every rank
    (``ranks``): the trainer's engine spans data- and sequence-parallel ranks alike.
    """
    params = cost.params
    trainable = params.trainable(cost.mode)
    states = model_state_bytes(
        trainable,
        zero_stage,
        ranks,
        precision,
        frozen=params.frozen(cost.mode),
        persistent=persistent_params(params, cost.mode),
        offload_optimizer=offload_optimizer,
        offload_param=offload_param,
    )
    host = states.pop("host")
    plan = {
        **states,
        "activations": float(cost.activation_bytes * micro_batch),
        # trainer.frozen_dtype=auto keeps them in the run's precision.
        "encoders": (2.0 if precision == "bf16" else 4.0) * encoder_params,
        "transient": transient_bytes(trainable, params.largest_module, zero_stage, ranks, precision)
        + exchange_buffer_bytes(cost),
    }
    plan["total"] = sum(plan.values())
    plan["host"] = host
    return plan


def _text_tokens(cfg: CapacityConfig) -> int | None:
    return cfg.text_tokens or None


def plan_cost(
    cfg: CapacityConfig,
    model: ModelConfig | None = None,
    mode: str | None = None,
    sequence_parallel: int | None = None,
    num_frames: int | None = None,
) -> TrainingCost:
    from omni_train.models.training_cost import training_cost

    return training_cost(
        model or cfg.model,
        cfg.resolution,
        num_frames or cfg.num_frames,
        _text_tokens(cfg),
        mode or cfg.finetune.mode,
        cfg.finetune.lora_rank,
        cfg.precision,
        sequence_parallel or cfg.sequence_parallel,
    )


def exchange_seconds(cfg: CapacityConfig, sent_bytes: float, sequence_parallel: int) -> float:
    """Time of a rank's sequence-parallel exchanges: each peer of the group gets an equal share
    of the bytes; peers on the same node over NVLink (or PCIe), the others over the network,
    both at ``link_efficiency`` of their bandwidth, the slower part setting the time. The
    exchanges sit between the projections and the attention, so no compute hides them."""
    if sequence_parallel == 1:
        return 0.0
    local = min(sequence_parallel, cfg.gpus_per_node)
    within = sent_bytes * (local - 1) / (sequence_parallel - 1)
    intra = (cfg.intra_node_gb_s or GPU_LINK_GB_S[cfg.gpu]) * 1e9 * cfg.link_efficiency
    inter = cfg.inter_node_gb_s * 1e9 * cfg.link_efficiency
    return max(within / intra, (sent_bytes - within) / inter)


def _check(cfg: CapacityConfig) -> float:
    """The GPU's memory in GiB, after checking the plan's inputs."""
    if cfg.gpu not in GPU_MEMORY_GB:
        raise ValueError(f"gpu={cfg.gpu!r}: use one of {', '.join(GPU_MEMORY_GB)}")
    if not 0 < cfg.mfu <= 1:
        raise ValueError(f"mfu={cfg.mfu}: use a fraction in (0, 1], e.g. 0.35")
    if len(cfg.resolution) != 2:
        raise ValueError(f"resolution={cfg.resolution} must be [height, width]")
    if cfg.sequence_parallel < 1 or cfg.num_gpus % cfg.sequence_parallel:
        raise ValueError(
            f"sequence_parallel={cfg.sequence_parallel} must be >= 1 and divide "
            f"num_gpus={cfg.num_gpus} (GPUs = data-parallel size x sequence_parallel)"
        )
    if cfg.gpus_per_node < 1:
        raise ValueError(f"gpus_per_node={cfg.gpus_per_node}: use the GPUs of one node, e.g. 8")
    if not 0 < cfg.link_efficiency <= 1 or cfg.inter_node_gb_s <= 0 or cfg.intra_node_gb_s < 0:
        raise ValueError(
            f"link_efficiency={cfg.link_efficiency}, inter_node_gb_s={cfg.inter_node_gb_s}, "
            f"intra_node_gb_s={cfg.intra_node_gb_s}: use a share in (0, 1] and positive GB/s "
            "(intra_node_gb_s=0 takes the GPU's own figure)"
        )
    return GPU_MEMORY_GB[cfg.gpu]


def _setups(cfg: CapacityConfig) -> list[tuple[int, str, str]]:
    """(ZeRO stage, optimizer offload, parameter offload) of the plan's rows: every stage the
    offload settings allow."""
    stages = [s for s in (0, 1, 2, 3) if cfg.offload_optimizer == "none" or s >= 1]
    if cfg.offload_param != "none":
        stages = [3]
    return [(s, cfg.offload_optimizer, cfg.offload_param if s == 3 else "none") for s in stages]


def estimate(cfg: CapacityConfig) -> dict[str, Any]:
    from omni_train.models.summary import encoder_parameter_counts, model_summary

    memory_gb = _check(cfg)
    # fp32 plans assume plain fp32 matmuls, as the trainer runs them (it enables no TF32).
    peak_tflops = peak_for_precision(gpu_peak(cfg.gpu), cfg.precision, tf32=False)
    summary = model_summary(
        cfg.model,
        cfg.resolution,
        cfg.num_frames,
        _text_tokens(cfg),
        cfg.finetune.mode,
        cfg.finetune.lora_rank,
    )
    cost = plan_cost(cfg)
    encoders = sum(encoder_parameter_counts(cfg.model).values())
    memory = {}
    for stage, offload_optimizer, offload_param in _setups(cfg):
        plan = memory_per_gpu(
            cost,
            encoders,
            stage,
            cfg.num_gpus,
            cfg.precision,
            cfg.micro_batch,
            offload_optimizer,
            offload_param,
        )
        memory[stage] = {key: value / GIB for key, value in plan.items()}
        memory[stage]["fits"] = memory[stage]["total"] < USABLE_SHARE * memory_gb
    sp = cfg.sequence_parallel
    samples_per_gpu = cfg.micro_batch * cfg.grad_accum
    global_batch = samples_per_gpu * cfg.num_gpus // sp
    # A GPU's work per step: its samples' training FLOPs (with SP, its rank's share of each
    # sample, the replicated embeddings included: counted) at the assumed MFU, plus the
    # exchanges.
    rank_flops = summary["train_flops_per_sample"] if sp == 1 else cost.train_flops
    compute_s = samples_per_gpu * rank_flops / (peak_tflops * 1e12 * cfg.mfu)
    exchange_s = samples_per_gpu * exchange_seconds(cfg, cost.sent_bytes, sp)
    step_s = compute_s + exchange_s
    clips_per_epoch = cfg.corpus_hours * 3600 / (cfg.num_frames / cfg.fps)
    stages = []
    starts = [s.start_step for s in cfg.curriculum.stages] + [cfg.max_steps]
    for stage, start, end in zip(cfg.curriculum.stages, starts, starts[1:], strict=False):
        steps = max(0, min(end, cfg.max_steps) - start)
        stages.append(
            {
                "name": stage.name,
                "steps": steps,
                "epochs": steps * global_batch / clips_per_epoch,
                "gpu_days": steps * step_s * cfg.num_gpus / 86400,
            }
        )
    return {
        "summary": summary,
        "memory_gib": memory,
        "global_batch": global_batch,
        "sequence_parallel": sp,
        "rank_flops_per_sample": rank_flops,
        "sent_bytes_per_sample": cost.sent_bytes,
        "compute_time_s": compute_s,
        "exchange_time_s": exchange_s,
        "step_time_s": step_s,
        "clips_per_epoch": clips_per_epoch,
        "stages": stages,
    }


def _clip(cfg: CapacityConfig, checkpointing: str) -> str:
    sharded = f", sequence parallel {cfg.sequence_parallel}" if cfg.sequence_parallel > 1 else ""
    return (
        f"{cfg.resolution[0]}x{cfg.resolution[1]}, {cfg.num_frames} frames, {cfg.precision}, "
        f"micro batch {cfg.micro_batch}, {checkpointing}, {cfg.num_gpus} x {cfg.gpu}{sharded}"
    )


def _checkpointing(model: ModelConfig) -> str:
    state = "with" if model.dit.gradient_checkpointing else "without"
    return f"{state} gradient checkpointing"


def render(cfg: CapacityConfig, result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        f"model {cfg.model.name} ({cfg.finetune.mode}): {s['trainable_params'] / 1e9:.3f}B "
        f"trainable, {s['frozen_params'] / 1e9:.3f}B frozen; {cfg.num_frames} frames at "
        f"{cfg.resolution[0]}x{cfg.resolution[1]} = {s['tokens']['video_tokens']} video tokens",
        f"{_clip(cfg, _checkpointing(cfg.model))}, global batch {result['global_batch']}",
        f"offload: optimizer {cfg.offload_optimizer}, parameters {cfg.offload_param} (ZeRO-3)",
        "",
        "zero  weights  grads  optim  activ  encod  trans   total GiB/GPU   host GiB/rank",
    ]
    for stage, m in result["memory_gib"].items():
        lines.append(
            f"{stage:>4} {m['weights']:8.2f} {m['gradients']:6.2f} {m['optimizer']:6.2f} "
            f"{m['activations']:6.2f} {m['encoders']:6.2f} {m['transient']:6.2f} "
            f"{m['total']:7.2f} {'fits' if m['fits'] else 'OOM ':<4} {m['host']:14.2f}"
        )
    sp = result["sequence_parallel"]
    if sp > 1:
        lines += [
            "",
            f"sequence parallel {sp}: {cfg.num_gpus // sp} data-parallel replicas; per rank "
            f"{result['rank_flops_per_sample'] / 1e12:.1f} TFLOP and "
            f"{result['sent_bytes_per_sample'] / GIB:.2f} GiB sent per sample "
            f"(unsharded {s['train_flops_per_sample'] / 1e12:.1f} TFLOP)",
            f"step: compute {result['compute_time_s']:.2f} s + exchanges "
            f"{result['exchange_time_s']:.3f} s "
            f"({result['exchange_time_s'] / result['step_time_s']:.1%} of the step)",
        ]
    lines += [
        "",
        f"step time at {cfg.mfu:.0%} MFU: {result['step_time_s']:.2f} s; "
        f"{result['clips_per_epoch']:.0f} clips per epoch",
        "stage              steps   epochs   GPU-days",
    ]
    for st in result["stages"]:
        lines.append(
            f"{st['name']:<16} {st['steps']:>7} {st['epochs']:8.2f} {st['gpu_days']:10.1f}"
        )
    total = sum(st["gpu_days"] for st in result["stages"])
    lines.append(f"{'total':<16} {cfg.max_steps:>7} {'':8} {total:10.1f}")
    return "\n".join(lines)


def vram_table(cfg: CapacityConfig, models: dict[str, ModelConfig]) -> list[dict[str, Any]]:
    """Rows of the VRAM table: each model x fine-tuning mode x (ZeRO stage, offload)."""
    from omni_train.models.finetune import FINETUNE_MODES
    from omni_train.models.summary import encoder_parameter_counts

    memory_gb = _check(cfg)
    rows = []
    for name, model in models.items():
        encoders = sum(encoder_parameter_counts(model).values())
        for mode in FINETUNE_MODES:
            cost = plan_cost(cfg, model, mode)
            for stage, offload in TABLE_SETUPS:
                plan = memory_per_gpu(
                    cost,
                    encoders,
                    stage,
                    cfg.num_gpus,
                    cfg.precision,
                    cfg.micro_batch,
                    offload_optimizer=offload,
                    offload_param=offload if stage == 3 else "none",
                )
                gib = {key: value / GIB for key, value in plan.items()}
                rows.append(
                    {
                        "model": name,
                        "checkpointing": model.dit.gradient_checkpointing,
                        "mode": mode,
                        "trainable": cost.params.trainable(mode),
                        "zero": stage,
                        "offload": offload,
                        **gib,
                        "fits": gib["total"] < USABLE_SHARE * memory_gb,
                    }
                )
    return rows


def render_table(cfg: CapacityConfig, rows: list[dict[str, Any]]) -> str:
    memory_gb = GPU_MEMORY_GB[cfg.gpu]
    lines = [
        f"GiB per GPU at {_clip(cfg, 'each preset with its gradient checkpointing')}; "
        f"fits = under {USABLE_SHARE:.0%} of "
        f"{memory_gb:g} GB. offload cpu = optimizer state (and ZeRO-2 gradients) on the "
        "host, and with ZeRO-3 the parameters too.",
        "",
        "| model | ckpt | mode | trainable | ZeRO | offload | weights | grads | optim | activations "
        "| encoders | transient | total GiB/GPU | host GiB/rank | fits |",
        "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {'yes' if r['checkpointing'] else 'no'} | {r['mode']} | "
            f"{r['trainable'] / 1e9:.3f}B | {r['zero']} | "
            f"{r['offload']} | {r['weights']:.1f} | {r['gradients']:.1f} | "
            f"{r['optimizer']:.1f} | {r['activations']:.1f} | {r['encoders']:.1f} | "
            f"{r['transient']:.1f} | {r['total']:.1f} | {r['host']:.1f} | "
            f"{'yes' if r['fits'] else 'no'} |"
        )
    return "\n".join(lines)


def _preset(name: str) -> ModelConfig:
    """conf/model/NAME.yaml, composed in the running Hydra app."""
    from hydra import compose

    return OmegaConf.to_object(compose(config_name="capacity", overrides=[f"model={name}"])).model


def render_table_summary(cfg: CapacityConfig, rows: list[dict[str, Any]]) -> str:
    """One line per model and mode: GiB per GPU of each (ZeRO stage, offload) setup."""
    memory_gb = GPU_MEMORY_GB[cfg.gpu]
    setups = [f"ZeRO-{stage} offload {offload}" for stage, offload in TABLE_SETUPS]
    lines = [
        f"GiB per GPU at {_clip(cfg, 'each preset with its gradient checkpointing')}; "
        f"x = over {USABLE_SHARE:.0%} of {memory_gb:g} GB",
        "",
        "| model | mode | trainable | " + " | ".join(setups) + " |",
        "| --- | --- | ---: |" + " ---: |" * len(setups),
    ]
    for start in range(0, len(rows), len(TABLE_SETUPS)):
        group = rows[start : start + len(TABLE_SETUPS)]
        cells = [f"{r['total']:.1f}" + ("" if r["fits"] else " x") for r in group]
        first = group[0]
        lines.append(
            f"| {first['model']} | {first['mode']} | {first['trainable'] / 1e9:.2f}B | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


# The longest-clip search stops here (latent frames: 4093 pixel frames, 164 s at 25 fps).
MAX_LATENT_FRAMES = 1024


def longest_latent_frames(
    total: Callable[[int], float], limit: float, sequence_parallel: int, high: int
) -> int:
    """The most latent frames L in [sequence_parallel, high] with total(L) < limit (total
    grows with L); sequence_parallel - 1 when none does.

    A rank's memory is affine in the frames it holds, ceil(L / sp), and in L (attention over
    the gathered sequence, the replicated embeddings): A + B ceil(L / sp) + C L. Three counts
    give A, B and C, the formula a first guess, and exact counts walk from it to the answer.
    """
    sp = sequence_parallel

    def fits(latent: int) -> bool:
        return total(latent) < limit

    first, second = 2 * sp, 3 * sp
    at_first, at_second = total(first), total(second)
    per_sp = at_second - at_first  # B + C sp
    per_frame = per_sp / sp if sp == 1 else total(second + 1) - at_second  # B + C
    c = (per_sp - per_frame) / (sp - 1) if sp > 1 else per_frame
    b = per_frame - c
    a = at_first - b * 2 - c * first

    def modelled(latent: int) -> float:
        return a + b * -(-latent // sp) + c * latent

    guess = sp
    while guess < high and modelled(guess + 1) < limit:
        guess += 1
    if fits(guess):
        good, bad = guess, None
        step = 1
        while bad is None and good < high:
            probe = min(good + step, high)
            good, bad = (probe, None) if fits(probe) else (good, probe)
            step *= 2
        if bad is None:
            return good
    else:
        good, bad, step = None, guess, 1
        while good is None:
            probe = max(bad - step, sp)
            if fits(probe):
                good = probe
            elif probe == sp:
                return sp - 1
            else:
                bad, step = probe, step * 2
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good


def _gib_per_gpu(
    cfg: CapacityConfig,
    model: ModelConfig,
    encoders: int,
    mode: str,
    sequence_parallel: int,
    latent_frames: int,
) -> float:
    from omni_train.contracts import pixel_frames

    stage = cfg.longest_zero_stage
    cost = plan_cost(cfg, model, mode, sequence_parallel, pixel_frames(latent_frames))
    plan = memory_per_gpu(
        cost,
        encoders,
        stage,
        max(cfg.num_gpus, sequence_parallel),
        cfg.precision,
        cfg.micro_batch,
        cfg.offload_optimizer,
        cfg.offload_param if stage == 3 else "none",
    )
    return plan["total"] / GIB


def longest_clip_table(cfg: CapacityConfig, models: dict[str, ModelConfig]) -> list[dict]:
    """For each model x longest_modes x longest_sp_sizes: the most pixel frames at the
    config's resolution whose plan fits one GPU at ZeRO stage longest_zero_stage (ZeRO over
    num_gpus ranks, at least the SP size); None where the SP size does not divide the heads."""
    from omni_train.contracts import pixel_frames
    from omni_train.models.denoiser import attention_heads
    from omni_train.models.summary import encoder_parameter_counts

    memory_gb = _check(cfg)
    if cfg.longest_zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"longest_zero_stage={cfg.longest_zero_stage}: use 0, 1, 2 or 3")
    if min(cfg.longest_sp_sizes, default=0) < 1:
        raise ValueError(f"longest_sp_sizes={cfg.longest_sp_sizes}: use sizes of 1 or more")
    rows = []
    for name, model in models.items():
        encoders = sum(encoder_parameter_counts(model).values())
        heads, _ = attention_heads(model)
        for mode in cfg.longest_modes:
            cells: dict[int, int | None] = {}
            for sp in cfg.longest_sp_sizes:
                if heads % sp:
                    cells[sp] = None  # Ulysses splits the heads
                    continue
                total = partial(_gib_per_gpu, cfg, model, encoders, mode, sp)
                latent = longest_latent_frames(
                    total, USABLE_SHARE * memory_gb, sp, MAX_LATENT_FRAMES
                )
                cells[sp] = pixel_frames(latent) if latent >= sp else 0
            rows.append({"model": name, "mode": mode, "frames": cells})
    return rows


def render_longest_clips(cfg: CapacityConfig, rows: list[dict]) -> str:
    from omni_train.contracts import pixel_frames

    memory_gb = GPU_MEMORY_GB[cfg.gpu]
    offload = cfg.offload_optimizer if cfg.offload_param == "none" else "optimizer + parameters"
    ceiling = pixel_frames(MAX_LATENT_FRAMES)
    sizes = cfg.longest_sp_sizes
    lines = [
        f"Longest clip per GPU (pixel frames, seconds at {cfg.fps:g} fps) at "
        f"{cfg.resolution[0]}x{cfg.resolution[1]}, {cfg.precision}, micro batch "
        f"{cfg.micro_batch}, each preset with its gradient checkpointing, ZeRO-"
        f"{cfg.longest_zero_stage} over {cfg.num_gpus} x {cfg.gpu} (offload {offload}), under "
        f"{USABLE_SHARE:.0%} of {memory_gb:g} GB; - = the SP size does not divide the "
        f"attention heads, 0 = not even the shortest clip fits, >= = the search's "
        f"{ceiling}-frame ceiling",
        "",
        "| model | mode | " + " | ".join(f"SP {sp}" for sp in sizes) + " |",
        "| --- | --- |" + " ---: |" * len(sizes),
    ]
    for row in rows:
        cells = []
        for sp in sizes:
            frames = row["frames"][sp]
            if frames is None:
                cells.append("-")
            elif frames == 0:
                cells.append("0")
            else:
                at_least = ">= " if frames >= ceiling else ""
                cells.append(f"{at_least}{frames} ({frames / cfg.fps:.1f} s)")
        lines.append(f"| {row['model']} | {row['mode']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


ConfigStore.instance().store(name="capacity_schema", node=CapacityConfig)


@hydra.main(version_base="1.3", config_path="../conf", config_name="capacity")
def main(raw: DictConfig) -> None:
    cfg: CapacityConfig = OmegaConf.to_object(raw)
    if cfg.longest:
        models = {name: _preset(name) for name in cfg.table_models}
        print(render_longest_clips(cfg, longest_clip_table(cfg, models)))
        return
    if cfg.table:
        models = {name: _preset(name) for name in cfg.table_models}
        rows = vram_table(cfg, models)
        print(render_table_summary(cfg, rows), render_table(cfg, rows), sep="\n\n")
        return
    print(render(cfg, estimate(cfg)))


if __name__ == "__main__":
    main()
