"""Ulysses sequence parallelism: the ranks of a sequence-parallel (SP) group share one sample and
split its latent frames; joint attention trades the frame shard for a head shard and back.

Layout. Every SP rank holds the same sample and keeps a contiguous run of whole latent frames
(``FrameShard``): L frames over N ranks give the first L mod N ranks one frame more than the
others, so no token is padded. The frame-local embeddings are computed for those frames only:
the patch embedding, the pose guider (from the pixel frames its causal convolutions and the
neighbour stacking reach, conditioning.PoseGuider), the motion-frame flag and the audio tokens,
so the frame-local audio cross-attention needs no communication either. Everything else (text
tokens, the reference tokens, the conditioning vector) stays replicated: each rank computes it
in full.

Attention (``ulysses_attention``). q/k/v of the frame tokens go through an all-to-all that
scatters heads and gathers the sequence: each rank then holds every frame token for
heads/N heads. Replicated tokens (text, reference) just take that head slice. Each rank
attends over the whole sequence with its heads; the frame part goes back by the inverse
all-to-all, the replicated part is all-gathered over heads (its backward sums the ranks'
gradients: a reduce-scatter). RoPE is applied before the all-to-all, on each rank's own rows.

Gradients. Each rank backpropagates its own frames' share of the loss; replicated values get
only the part of their gradient that flows through this rank's tokens and heads. The loss
(``sharded_flow_matching_loss``) sums the squared errors over the group in the forward and, in
the backward, gives this rank's share ``size`` times the gradient, so that the AVERAGE of the
parameter gradients over the SP group is the unsharded gradient. A data-parallel average over
all dp x sp ranks therefore gives the dp-average of unsharded gradients with nothing changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
import torch.distributed as dist

from omni_train.diffusion.flow import flow_matching_loss, noisy_latents


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's place in its sequence-parallel group (``group`` None = the default group)."""

    group: Any
    rank: int
    size: int

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"sequence-parallel rank {self.rank} of size {self.size} is invalid")

    @classmethod
    def of_group(cls, group: Any = None) -> SequenceParallel:
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def shard_frames(self, frames: int, tokens_per_frame: int) -> FrameShard:
        if frames < self.size:
            raise ValueError(
                f"trainer.sequence_parallel={self.size} is more than the clip's {frames} latent "
                "frames: every sequence-parallel rank needs at least one whole frame"
            )
        base, extra = divmod(frames, self.size)
        counts = [base + (r < extra) for r in range(self.size)]
        starts = [sum(counts[:r]) for r in range(self.size + 1)]
        return FrameShard(self, tuple(starts), tokens_per_frame)


def frame_shard(
    sequence_parallel: SequenceParallel | None,
    frames: int,
    tokens_per_frame: int,
    num_heads: int,
    heads_setting: str,
) -> FrameShard | None:
    """A denoiser's frames on this rank (None without sequence parallelism or at size 1),
    after checking that the group splits its ``num_heads`` (set by ``heads_setting``)."""
    if sequence_parallel is None or sequence_parallel.size == 1:
        return None
    check_heads(num_heads, sequence_parallel.size, heads_setting)
    return sequence_parallel.shard_frames(frames, tokens_per_frame)


def sequence_parallel_groups(size: int) -> SequenceParallel:
    """Split the default group into SP groups of ``size`` consecutive ranks; this rank's.

    Every rank must call it (``new_group`` is collective). Rank g is SP rank g % size of the
    data-parallel replica g // size.
    """
    world = dist.get_world_size()
    if size < 1 or world % size:
        raise ValueError(
            f"trainer.sequence_parallel={size} must be >= 1 and divide the world size {world} "
            "(world = data-parallel size x sequence_parallel)"
        )
    rank = dist.get_rank()
    mine = None
    for first in range(0, world, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = group
    return SequenceParallel(mine, rank % size, size)


def check_heads(num_heads: int, size: int, setting: str) -> None:
    """Ulysses splits the attention heads over the SP ranks: ``size`` must divide them."""
    if num_heads % size:
        valid = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(
            f"trainer.sequence_parallel={size} does not divide {setting}={num_heads} (the "
            f"attention heads are split over the sequence-parallel ranks); use one of {valid}"
        )


@dataclass(frozen=True)
class FrameShard:
    """This rank's frames of one clip. A token axis laid out as [frame tokens (frame-major);
    extra tokens] keeps rows ``token_start:token_stop`` and every extra token."""

    sp: SequenceParallel
    frame_starts: tuple[int, ...]  # rank r holds frames frame_starts[r] : frame_starts[r + 1]
    tokens_per_frame: int

    @property
    def start(self) -> int:
        return self.frame_starts[self.sp.rank]

    @property
    def stop(self) -> int:
        return self.frame_starts[self.sp.rank + 1]

    @property
    def token_counts(self) -> list[int]:
        """Frame tokens held by each rank."""
        return [(b - a) * self.tokens_per_frame for a, b in pairwise(self.frame_starts)]

    @property
    def num_tokens(self) -> int:
        return self.token_counts[self.sp.rank]

    def local_rows(self, x: torch.Tensor, dim: int, num_frame_tokens: int) -> torch.Tensor:
        """This rank's frame-token rows of ``x`` along ``dim``, then every row after the
        ``num_frame_tokens`` frame tokens (the replicated extras)."""
        first = self.start * self.tokens_per_frame
        mine = x.narrow(dim, first, self.num_tokens)
        extras = x.narrow(dim, num_frame_tokens, x.shape[dim] - num_frame_tokens)
        return torch.cat([mine, extras], dim=dim)


# Collectives. Tensors are (..., heads, tokens, head_dim).


@dataclass
class ExchangeCount:
    """What this rank's exchanges moved (``counting_exchanges``)."""

    sent_bytes: int = 0  # to the other ranks of the group (its own chunk stays local)
    largest_bytes: int = 0  # the largest single exchange's send buffer, every chunk
    calls: int = 0


_COUNTERS: list[ExchangeCount] = []


@contextmanager
def counting_exchanges() -> Iterator[ExchangeCount]:
    """Count the exchanges (all-to-alls and head all-gathers) this rank runs inside the
    block: forward and backward, both directions."""
    count = ExchangeCount()
    _COUNTERS.append(count)
    try:
        yield count
    finally:
        _COUNTERS.remove(count)


def _exchange(
    send: Sequence[torch.Tensor], recv_shapes: Sequence[torch.Size], sp: SequenceParallel
) -> list[torch.Tensor]:
    """Send ``send[r]`` to rank r; return what each rank r sent here, shaped ``recv_shapes[r]``.

    On meta tensors nothing is sent: the capacity planner runs one rank's step that way (with
    ``SequenceParallel(None, rank, size)``, no process group) to count its FLOPs, activations
    and the bytes it would send."""
    sizes = [chunk.numel() * chunk.element_size() for chunk in send]
    for count in _COUNTERS:
        count.sent_bytes += sum(size for r, size in enumerate(sizes) if r != sp.rank)
        count.largest_bytes = max(count.largest_bytes, sum(sizes))
        count.calls += 1
    if send[0].is_meta:
        return [send[0].new_empty(shape) for shape in recv_shapes]
    flat = torch.cat([chunk.reshape(-1) for chunk in send])
    recv_sizes = [torch.Size(shape).numel() for shape in recv_shapes]
    received = flat.new_empty(sum(recv_sizes))
    dist.all_to_all_single(
        received,
        flat,
        output_split_sizes=recv_sizes,
        input_split_sizes=[chunk.numel() for chunk in send],
        group=sp.group,
    )
    return [
        piece.view(shape)
        for piece, shape in zip(received.split(recv_sizes), recv_shapes, strict=True)
    ]


def _tokens_to_heads(x: torch.Tensor, shard: FrameShard) -> torch.Tensor:
    """(..., H, own tokens, d) -> (..., H / sp, all ranks' tokens, d)."""
    send = x.chunk(shard.sp.size, dim=-3)
    shapes = [(*send[0].shape[:-2], count, x.shape[-1]) for count in shard.token_counts]
    return torch.cat(_exchange(send, shapes, shard.sp), dim=-2)


def _heads_to_tokens(x: torch.Tensor, shard: FrameShard) -> torch.Tensor:
    """(..., H / sp, all ranks' tokens, d) -> (..., H, own tokens, d)."""
    send = x.split(shard.token_counts, dim=-2)
    shape = (*x.shape[:-2], shard.num_tokens, x.shape[-1])
    return torch.cat(_exchange(send, [shape] * shard.sp.size, shard.sp), dim=-3)


class _TokensToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shard: FrameShard) -> torch.Tensor:
        ctx.shard = shard
        return _tokens_to_heads(x, shard)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _heads_to_tokens(grad.contiguous(), ctx.shard), None


class _HeadsToTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shard: FrameShard) -> torch.Tensor:
        ctx.shard = shard
        return _heads_to_tokens(x, shard)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _tokens_to_heads(grad.contiguous(), ctx.shard), None


class _GatherHeads(torch.autograd.Function):
    """All-gather of a replicated token set's head shards; backward: reduce-scatter (sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
        ctx.sp = sp
        return torch.cat(_exchange([x] * sp.size, [x.shape] * sp.size, sp), dim=-3)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sp = ctx.sp
        send = grad.contiguous().chunk(sp.size, dim=-3)
        return torch.stack(_exchange(send, [send[0].shape] * sp.size, sp)).sum(0), None


class _SumOverGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
        ctx.size = sp.size
        total = x.clone()
        if not total.is_meta:
            dist.all_reduce(total, group=sp.group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.size, None


def tokens_to_heads(x: torch.Tensor, shard: FrameShard) -> torch.Tensor:
    """All-to-all: this rank's frame tokens with all heads -> every rank's frame tokens with this
    rank's heads (ranks in order). Its backward is the inverse all-to-all."""
    return _TokensToHeads.apply(x.contiguous(), shard)


def heads_to_tokens(x: torch.Tensor, shard: FrameShard) -> torch.Tensor:
    """The inverse of ``tokens_to_heads``."""
    return _HeadsToTokens.apply(x.contiguous(), shard)


def gather_heads(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """(..., H / sp, N, d) head shards of a replicated token set -> (..., H, N, d) on every rank.
    The backward sums the ranks' gradients of each shard (they are partial: each rank's copy
    feeds only its own tokens and heads downstream)."""
    return _GatherHeads.apply(x.contiguous(), sp)


def sum_over_group(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """The group's sum of ``x`` on every rank. Backward: ``size`` x the gradient to this rank's
    part, so the group's average parameter gradient is the unsharded one (module docstring)."""
    return _SumOverGroup.apply(x, sp)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shard: FrameShard,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    q_before: int = 0,
    kv_before: int = 0,
) -> torch.Tensor:
    """Attention over the whole sequence from each rank's shard of it.

    q, k, v: (B, H, tokens, d) laid out [``*_before`` replicated tokens; this rank's frame
    tokens; replicated tokens after]. ``attend(q, k, v)`` runs on the gathered sequence
    [before; every rank's frame tokens; after] with this rank's H / sp heads (it applies the
    key mask of that sequence). Returns the output for the q layout, all heads.
    """
    sp = shard.sp
    heads = q.shape[1] // sp.size
    own = slice(sp.rank * heads, (sp.rank + 1) * heads)

    def split(x: torch.Tensor, before: int) -> tuple[torch.Tensor, ...]:
        rest = x.shape[2] - before - shard.num_tokens
        return x.split([before, shard.num_tokens, rest], dim=2)

    q_parts, k_parts, v_parts = split(q, q_before), split(k, kv_before), split(v, kv_before)
    # The frame parts have the same shape whatever the layouts: one exchange for all three.
    q_frames, k_frames, v_frames = tokens_to_heads(
        torch.stack([q_parts[1], k_parts[1], v_parts[1]]), shard
    ).unbind(0)

    def gathered(parts: tuple[torch.Tensor, ...], frames: torch.Tensor) -> torch.Tensor:
        return torch.cat([parts[0][:, own], frames, parts[2][:, own]], dim=2)

    out = attend(
        gathered(q_parts, q_frames), gathered(k_parts, k_frames), gathered(v_parts, v_frames)
    )
    num_frames = out.shape[2] - q_parts[0].shape[2] - q_parts[2].shape[2]
    before, frames, after = out.split([q_parts[0].shape[2], num_frames, q_parts[2].shape[2]], dim=2)
    replicated = gather_heads(torch.cat([before, after], dim=2), sp)
    return torch.cat(
        [
            replicated[:, :, : before.shape[2]],
            heads_to_tokens(frames, shard),
            replicated[:, :, before.shape[2] :],
        ],
        dim=2,
    )


def sharded_flow_matching_loss(
    model_fn: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    num_motion_latents: int = 0,
    sequence_parallel: SequenceParallel | None = None,
    **cond: object,
) -> torch.Tensor:
    """``flow_matching_loss`` with the denoiser run sequence-parallel: every SP rank passes the
    same full x0, noise, t and conditions; ``model_fn(..., sequence_parallel=sp)`` returns the
    velocity of this rank's frames (``SequenceParallel.shard_frames``). Returns the per-sample
    loss (B,) of the whole clip on every rank (motion frames excluded, as there): the squared
    errors are summed over the group, the element count is the clip's (known on every rank).
    Its gradient follows ``sum_over_group``: average the parameter gradients over the group.
    """
    if sequence_parallel is None or sequence_parallel.size == 1:
        return flow_matching_loss(model_fn, x0, noise, t, num_motion_latents, **cond)
    frames = x0.shape[2]
    if not 0 <= num_motion_latents < frames:
        raise ValueError(f"num_motion_latents={num_motion_latents} not in [0, {frames})")
    x_t = noisy_latents(x0, noise, t, num_motion_latents)
    prediction = model_fn(
        x_t, t, num_motion_latents=num_motion_latents, sequence_parallel=sequence_parallel, **cond
    )
    shard = sequence_parallel.shard_frames(frames, tokens_per_frame=1)
    if prediction.shape[2] != shard.stop - shard.start:
        raise ValueError(
            f"the denoiser returned {prediction.shape[2]} frames under sequence parallelism; "
            f"rank {sequence_parallel.rank} holds frames {shard.start}:{shard.stop}"
        )
    first = max(num_motion_latents, shard.start)  # generated frames of this rank
    target = (noise - x0)[:, :, first : shard.stop]
    error = prediction.float()[:, :, first - shard.start :] - target.float()
    squared = sum_over_group(error.square().flatten(1).sum(dim=1), sequence_parallel)
    return squared / x0[0, :, num_motion_latents:].numel()
