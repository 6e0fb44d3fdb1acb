"""The longest clip one GPU trains, per preset, fine-tuning mode and sequence-parallel size
(``python -m omni_train.capacity longest=true``): a search over latent frames of the capacity
planner's memory per GPU (omni_train/capacity.py)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from omni_train.capacity import (
    GIB,
    GPU_MEMORY_GB,
    USABLE_SHARE,
    CapacityConfig,
    check_inputs,
    memory_per_gpu,
    plan_cost,
)
from omni_train.contracts import pixel_frames
from omni_train.models.config import ModelConfig

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
    from omni_train.models.denoiser import attention_heads
    from omni_train.models.summary import encoder_parameter_counts

    memory_gb = check_inputs(cfg)
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
