"""The all-to-all share of a sequence-parallel (Ulysses) training step on CPU ranks.

One sample of the `small` preset (its all-zero weights given random values, so every layer
does real work), a 256x256 clip of 33 frames: 9 latent frames of 16x16 patches, 2304 frame
tokens, 256 reference tokens and 64 text tokens; text, reference and audio on, pose off (the
pose guider runs on every rank in full at pixel resolution, replicated work outside what this
measures). fp32, 1 torch thread per rank. The step is the forward + backward of
``sharded_flow_matching_loss`` (no optimizer step, no data-parallel gradient average), STEPS
timed after a warm-up, medians of wall and CPU seconds printed (the CPU seconds are the work
done, a rank's waits for a core or for the other rank left out):

    SP=1   one process: the floor (the same clip unsharded)
    SP=2   2 forked gloo ranks (omni_train.testing.run_ranks); frames split 5 + 4

Inside the SP=2 ranks the collectives are timed by wrapping ``_exchange`` (every all-to-all
and all-gather of ``ulysses_attention``, forward and backward) and ``dist.all_reduce`` (the
loss's ``sum_over_group``, the only all-reduce of the step) with perf_counter and
process_time: their time and CPU time per step, their share of the step, the bytes each rank
sends to the other per step (the part of an all-to-all a rank keeps for itself is not sent),
and the effective bandwidth those give. A
collective's time includes waiting for the other rank (the one with 5 frames computes more),
so that bandwidth is a lower bound; the bare all-to-all of the largest exchange, timed alone
afterwards, gives the link's own. The bytes predicted from the shapes are printed next to
the counted ones, and a projection (labelled so) of the share those bytes would take on
H100s over NVLink. Ranks are processes: on fewer free cores than ranks they share cores, and
the speed-up cannot exceed the free cores (this project's development machine has 2, shared).

    .venv/bin/python benchmarks/bench_sequence_parallel.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from omni_train.testing import run_ranks  # noqa: E402

MODEL = "small"
RESOLUTION = 256
FRAMES = 33
BATCH = 1
STEPS = 3  # timed, after one untimed warm-up step
BARE_REPEATS = 10  # the bare all-to-all
# Projection: H100 SXM dense bf16 peak, the model FLOPs utilisation assumed, NVLink bandwidth
# one GPU's all-to-all gets (per direction), bf16 activations (2 bytes).
H100_BF16_FLOPS = 989e12
ASSUMED_MFU = 0.40
NVLINK_BYTES_PER_S = 450e9
BF16_BYTES = 2


@dataclass(frozen=True)
class Clip:
    resolution: int
    frames: int
    text_tokens: int | None = None  # None: the text encoder's max_length


BENCH_CLIP = Clip(RESOLUTION, FRAMES)
# (preset, clip, SP size) the projection covers: the bench itself, then a production size.
PROJECTIONS = (
    (MODEL, BENCH_CLIP, 2),
    ("7b", BENCH_CLIP, 2),
    ("7b", Clip(512, 129), 8),
)


def exchanged_bytes(cfg, clip: Clip, sp_size: int, sp_rank: int, element_bytes: int) -> int:
    """Bytes SP rank ``sp_rank`` sends to the other ranks in one training step (forward +
    backward, no activation checkpointing) of this project's MMDiT on ``BATCH`` samples, from
    the shapes.

    Per joint-attention block, D = hidden size, F = the clip's frame tokens, F_r = this rank's,
    R = the replicated tokens whose output is all-gathered (reference, and text while the text
    stream emits output, i.e. every block but the last):
    - q/k/v of the frame tokens, heads scattered: 3 (N - 1) D/N F_r forward, and their
      gradients back, 3 D/N (F - F_r);
    - the output back to its frames: D/N (F - F_r) forward, its gradient (N - 1) D/N F_r;
    - the replicated tokens' all-gather: (N - 1) D/N R forward, the same for its backward
      (an all-to-all of the gradient shards, summed on arrival).
    """
    from omni_train.models.flops import token_counts
    from omni_train.models.sequence_parallel import SequenceParallel

    counts = token_counts(cfg, (clip.resolution, clip.resolution), clip.frames, clip.text_tokens)
    shard = SequenceParallel(None, sp_rank, sp_size).shard_frames(
        counts.latent_frames, counts.tokens_per_frame
    )
    width, n = cfg.dit.hidden_size, sp_size
    frames, own = counts.frame_tokens, shard.num_tokens
    all_to_all = 4 * ((n - 1) * own + frames - own)  # q/k/v + output, forward + backward
    elements = 0
    for block in range(cfg.dit.depth):
        replicated = counts.reference_tokens + (
            counts.text_tokens if block < cfg.dit.depth - 1 else 0
        )
        elements += all_to_all + 2 * (n - 1) * replicated
    return BATCH * elements * width // n * element_bytes


def _inputs(cfg):
    import torch

    from omni_train.contracts import CONDITIONS, SPATIAL_STRIDE, latent_frames

    gen = torch.Generator().manual_seed(0)
    channels, latent = cfg.vae.latent_channels, RESOLUTION // SPATIAL_STRIDE
    shape = (BATCH, channels, latent_frames(FRAMES), latent, latent)
    text_tokens = cfg.text_encoder.max_length
    return {
        "x0": torch.randn(shape, generator=gen),
        "noise": torch.randn(shape, generator=gen),
        "t": torch.rand(BATCH, generator=gen),
        "cond": {
            "text": torch.randn(BATCH, text_tokens, cfg.text_encoder.d_model, generator=gen),
            "text_mask": torch.ones(BATCH, text_tokens, dtype=torch.bool),
            "ref_latents": torch.randn(BATCH, channels, 1, latent, latent, generator=gen),
            "audio_features": torch.randn(
                BATCH, FRAMES, cfg.audio_encoder.feature_dim, generator=gen
            ),
            "pose_heatmaps": None,
            "active": {
                name: torch.full((BATCH,), name != "pose", dtype=torch.bool) for name in CONDITIONS
            },
        },
    }


def _train_steps(sp_size: int) -> dict:
    """In a rank: 1 + STEPS training steps of the clip, SP over all ``sp_size`` ranks (1: no
    process group); the step times and, under SP, the collectives' time and bytes per step."""
    import torch
    import torch.distributed as dist

    from omni_train.describe import model_preset
    from omni_train.models import sequence_parallel as sp_module
    from omni_train.models.denoiser import build_denoiser
    from omni_train.testing import pretrained_like

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = model_preset(MODEL)
    model = pretrained_like(build_denoiser(cfg))
    x = _inputs(cfg)
    sp = None
    spent = {"seconds": 0.0, "cpu": 0.0, "bytes": 0, "calls": 0, "largest": 0}
    if sp_size > 1:
        dist.init_process_group("gloo")
        sp = sp_module.SequenceParallel.of_group()
        exchange, all_reduce = sp_module._exchange, dist.all_reduce

        def timed_exchange(send, *args, **kwargs):
            started, cpu_started = time.perf_counter(), time.process_time()
            out = exchange(send, *args, **kwargs)
            spent["seconds"] += time.perf_counter() - started
            spent["cpu"] += time.process_time() - cpu_started
            sent = [c.numel() * c.element_size() for r, c in enumerate(send) if r != sp.rank]
            spent["bytes"] += sum(sent)
            spent["calls"] += 1
            spent["largest"] = max(spent["largest"], sum(c.numel() for c in send))
            return out

        def timed_all_reduce(tensor, *args, **kwargs):
            started, cpu_started = time.perf_counter(), time.process_time()
            out = all_reduce(tensor, *args, **kwargs)
            spent["seconds"] += time.perf_counter() - started
            spent["cpu"] += time.process_time() - cpu_started
            return out

        sp_module._exchange = timed_exchange
        dist.all_reduce = timed_all_reduce  # the step's only all-reduce: the loss's group sum

    steps = []
    for _ in range(1 + STEPS):
        if sp is not None:
            dist.barrier()
        spent.update(seconds=0.0, cpu=0.0, bytes=0, calls=0)
        model.zero_grad(set_to_none=True)
        started, cpu_started = time.perf_counter(), time.process_time()
        loss = sp_module.sharded_flow_matching_loss(
            model, x["x0"], x["noise"], x["t"], sequence_parallel=sp, **x["cond"]
        )
        loss.mean().backward()
        steps.append(
            {
                "step_s": time.perf_counter() - started,
                "cpu_s": time.process_time() - cpu_started,
                "collective_s": spent["seconds"],
                "collective_cpu_s": spent["cpu"],
                "bytes": spent["bytes"],
                "calls": spent["calls"],
            }
        )
    result = {key: statistics.median(step[key] for step in steps[1:]) for key in steps[1].keys()}
    result["loss"] = loss.detach().tolist()
    if sp is not None:
        dist.all_reduce = all_reduce
        result["bare_s"], result["bare_bytes"] = _bare_all_to_all(spent["largest"], sp)
        result["predicted_bytes"] = exchanged_bytes(cfg, BENCH_CLIP, sp.size, sp.rank, 4)
        dist.destroy_process_group()
    return result


def _bare_all_to_all(elements: int, sp) -> tuple[float, int]:
    """Median seconds of an fp32 all-to-all of ``elements`` (split evenly), after a barrier,
    and the bytes it sends to the other ranks."""
    import torch
    import torch.distributed as dist

    largest = torch.tensor([elements - elements % sp.size])
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)  # the ranks' largest exchanges differ
    elements = int(largest)
    flat, received = torch.randn(elements), torch.empty(elements)
    times = []
    for _ in range(1 + BARE_REPEATS):
        dist.barrier()
        started = time.perf_counter()
        dist.all_to_all_single(received, flat)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:]), elements * 4 * (sp.size - 1) // sp.size


def _projection_rows() -> list[str]:
    from omni_train.describe import model_preset
    from omni_train.models.flops import flop_breakdown

    rows = []
    for preset, clip, sp_size in PROJECTIONS:
        cfg = model_preset(preset)
        parts = flop_breakdown(
            cfg, (clip.resolution, clip.resolution), clip.frames, clip.text_tokens
        )
        flops = BATCH * sum(part.train for name, part in parts.items() if name != "pose")
        compute_s = flops / sp_size / (ASSUMED_MFU * H100_BF16_FLOPS)
        sent = max(exchanged_bytes(cfg, clip, sp_size, r, BF16_BYTES) for r in range(sp_size))
        comm_s = sent / NVLINK_BYTES_PER_S
        text = clip.text_tokens or cfg.text_encoder.max_length
        rows.append(
            f"  {preset:<6} {clip.resolution}x{clip.resolution}x{clip.frames}, {text} text, "
            f"SP={sp_size}: {flops / 1e12:8.2f} TFLOP/sample, {sent / 2**20:8.1f} MiB sent/rank "
            f"-> compute {compute_s * 1e3:8.2f} ms, all-to-all {comm_s * 1e3:7.2f} ms, share "
            f"{comm_s / (compute_s + comm_s):.1%} (none overlapped)"
        )
    return rows


def main() -> None:
    from omni_train.describe import model_preset
    from omni_train.models.flops import token_counts
    from omni_train.models.sequence_parallel import SequenceParallel

    floor = run_ranks(_train_steps, 1, 1, timeout=900)[0]
    ranks = run_ranks(_train_steps, 2, 2, timeout=900)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    n = token_counts(model_preset(MODEL), (RESOLUTION, RESOLUTION), FRAMES)
    split = SequenceParallel(None, 0, 2).shard_frames(n.latent_frames, 1).token_counts
    print(
        f"`{MODEL}`, one sample {RESOLUTION}x{RESOLUTION}x{FRAMES} ({n.frame_tokens} frame + "
        f"{n.reference_tokens} reference + {n.text_tokens} text tokens), fp32, 1 thread per rank;"
        f" forward + backward of the loss, median of {STEPS} after a warm-up; "
        f"{os.cpu_count()} cores, load {load:.1f}"
    )
    sp2 = max(rank["step_s"] for rank in ranks)
    slowest = max(rank["cpu_s"] for rank in ranks)
    print(f"step SP=1 (floor)   {floor['step_s']:6.2f} s   CPU {floor['cpu_s']:.2f} s")
    print(
        f"step SP=2           {sp2:6.2f} s   speed-up {floor['step_s'] / sp2:.2f}x; the busier "
        f"rank's CPU {slowest:.2f} s: {floor['cpu_s'] / slowest:.2f}x less work than the floor "
        f"(frames split {' + '.join(map(str, split))}; the ceiling with a free core "
        f"per rank)"
    )
    for rank, result in enumerate(ranks):
        seconds, sent = result["collective_s"], result["bytes"]
        predicted, collective_cpu = result["predicted_bytes"], result["collective_cpu_s"]
        agreement = "equal" if sent == predicted else f"off by {sent - predicted:+d} B"
        bare_rate = result["bare_bytes"] / result["bare_s"]
        print(
            f"rank {rank}: step {result['step_s']:.2f} s, CPU {result['cpu_s']:.2f} s; "
            f"collectives {seconds:.3f} s/step = {seconds / result['step_s']:.1%} of the step "
            f"({result['calls']} exchanges + 1 all-reduce); their CPU {collective_cpu:.3f} s "
            f"= {collective_cpu / result['cpu_s']:.1%} of the step's CPU"
        )
        print(
            f"        sent {sent:,} B/step ({sent / 2**20:.1f} MiB; from the shapes {predicted:,} "
            f"B: {agreement}), {sent / seconds / 1e6:.0f} MB/s effective (waits included)"
        )
        print(
            f"        bare all-to-all of the largest exchange ({result['bare_bytes'] / 2**20:.2f} "
            f"MiB sent): {result['bare_s'] * 1e3:.2f} ms, {bare_rate / 1e6:.0f} MB/s; at that "
            f"rate the step's bytes take {sent / bare_rate * 1e3:.0f} ms, the rest of the "
            f"collectives' time is waiting for the other rank"
        )
    differences = [abs(a - b) for a, b in zip(floor["loss"], ranks[0]["loss"], strict=True)]
    print(f"loss SP=2 vs SP=1: max |difference| {max(differences):.1e}")
    print(
        f"PROJECTION, not measured: bf16 bytes from the shapes at {NVLINK_BYTES_PER_S / 1e9:.0f} "
        f"GB/s all-to-all against the counted FLOPs (pose excluded) at {ASSUMED_MFU:.0%} MFU of "
        f"an H100 ({H100_BF16_FLOPS / 1e12:.0f} TFLOP/s bf16), batch {BATCH}, latency ignored:"
    )
    for row in _projection_rows():
        print(row)


if __name__ == "__main__":
    main()
