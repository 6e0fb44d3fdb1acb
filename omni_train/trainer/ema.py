"""Exponential moving average of the trainable weights, sharded over the ranks.

Rank r keeps the average of flat elements [r * s, (r + 1) * s) of every trainable parameter,
s = ceil(numel / world_size): exactly the partition ZeRO-3 gives that rank (``ds_tensor``),
and an equal share of the full tensor under ZeRO 0-2. Memory per rank is therefore
parameters / world_size in fp32 whatever the ZeRO stage, nothing is gathered per step, and
the full average is assembled on the main rank only when a checkpoint is written. The file
holds full tensors, so a run resumes its EMA on any world size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from omni_train.trainer.config import EMAConfig

EMA_FILE = "ema.safetensors"


def _numel(param: nn.Parameter) -> int:
    return int(getattr(param, "ds_numel", param.numel()))


def shard_bounds(numel: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """(start, valid length, padded shard size) of ``rank``'s slice of a flat tensor."""
    size = math.ceil(numel / world_size)
    start = min(rank * size, numel)
    return start, max(0, min(size, numel - start)), size


def _local_slice(param: nn.Parameter, rank: int, world_size: int) -> torch.Tensor:
    start, length, _ = shard_bounds(_numel(param), rank, world_size)
    if hasattr(param, "ds_tensor"):  # ZeRO-3: this rank's partition, padded at the end
        return param.ds_tensor.data.view(-1)[:length]
    return param.data.view(-1)[start : start + length]


class ShardedEMA:
    def __init__(self, module: nn.Module, cfg: EMAConfig, rank: int, world_size: int) -> None:
        if not 0.0 < cfg.decay < 1.0:
            raise ValueError(f"trainer.ema.decay={cfg.decay}: use a value in (0, 1), e.g. 0.9999")
        if cfg.update_every < 1:
            raise ValueError(f"trainer.ema.update_every={cfg.update_every}: use 1 or more")
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.shadow: dict[str, torch.Tensor] = {}
        self.restart()

    def restart(self) -> None:
        """Start the average at the current weights (a new run's, or a resumed run's whose
        checkpoint holds no average)."""
        self.shadow = {
            name: _local_slice(p, self.rank, self.world_size).detach().float().clone()
            for name, p in self.params.items()
        }

    def _pairs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for name, param in self.params.items():
            yield self.shadow[name], _local_slice(param, self.rank, self.world_size)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after update number ``step`` (1-based)."""
        if step % self.cfg.update_every:
            return
        pairs = [(s, w.float()) for s, w in self._pairs() if s.numel()]
        if not pairs:
            return
        shadows, weights = zip(*pairs, strict=True)
        if step <= self.cfg.start_step:
            torch._foreach_copy_(list(shadows), list(weights))
        else:
            torch._foreach_lerp_(list(shadows), list(weights), 1.0 - self.cfg.decay)

    @torch.no_grad()
    def gather(self, is_main: bool) -> dict[str, torch.Tensor] | None:
        """Full averaged tensors on the main rank (None elsewhere); every rank must call."""
        full: dict[str, torch.Tensor] = {}
        for name, param in self.params.items():
            numel = _numel(param)
            _, length, size = shard_bounds(numel, self.rank, self.world_size)
            padded = torch.zeros(size, dtype=torch.float32, device=self.shadow[name].device)
            padded[:length] = self.shadow[name]
            if self.world_size == 1:
                parts = [padded]
            else:
                parts = (
                    [torch.empty_like(padded) for _ in range(self.world_size)] if is_main else None
                )
                dist.gather(padded, gather_list=parts, dst=0)
            if is_main:
                shape = tuple(getattr(param, "ds_shape", param.shape))
                full[name] = torch.cat(parts)[:numel].view(shape).cpu()
        return full if is_main else None

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full average on the main rank (None elsewhere); every rank must call."""
        return self.gather(self.rank == 0)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.load_full(state)

    @torch.no_grad()
    def load_full(self, state: Mapping[str, torch.Tensor]) -> None:
        """Take this rank's slices of a full averaged state (as written by ``gather``)."""
        missing = sorted(set(self.params) - set(state))
        if missing:
            raise ValueError(
                f"EMA state lacks {len(missing)} trainable parameter(s), e.g. {missing[:3]}: "
                "it belongs to another model; delete ema.safetensors to restart the average"
            )
        for name, param in self.params.items():
            start, length, _ = shard_bounds(_numel(param), self.rank, self.world_size)
            flat = state[name].reshape(-1).float()
            self.shadow[name].copy_(flat[start : start + length])
