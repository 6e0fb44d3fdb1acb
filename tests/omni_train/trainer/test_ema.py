"""The sharded EMA on one process: slices of a 3-rank layout add up to the plain average."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from omni_train.trainer.config import EMAConfig
from omni_train.trainer.ema import ShardedEMA, shard_bounds


def test_shard_bounds_cover_the_tensor_once():
    covered = []
    for rank in range(3):
        start, length, size = shard_bounds(10, rank, 3)
        assert size == 4
        covered += list(range(start, start + length))
    assert covered == list(range(10))
    assert shard_bounds(2, 3, 4) == (2, 0, 1)  # more ranks than elements


def test_sharded_average_equals_the_plain_one_and_reloads_on_another_layout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 1))
    model[1].bias.requires_grad_(False)  # frozen weights are not averaged
    cfg = EMAConfig(enabled=True, decay=0.9)
    shards = [ShardedEMA(model, cfg, rank, 3) for rank in range(3)]
    plain = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for step in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        for ema in shards:
            ema.update(step)
        for name, p in model.named_parameters():
            if name in plain:
                plain[name].lerp_(p.detach(), 0.1)
    assert set(shards[0].shadow) == set(plain)
    for name, value in plain.items():
        joined = torch.cat([ema.shadow[name] for ema in shards])
        assert torch.allclose(joined, value.reshape(-1))
    single = ShardedEMA(model, cfg, 0, 1)
    single.load_full(plain)
    full = single.gather(is_main=True)
    assert all(torch.equal(full[n], plain[n]) for n in plain)


def test_bad_decay_is_explained():
    with pytest.raises(ValueError, match="trainer.ema.decay"):
        ShardedEMA(nn.Linear(2, 2), EMAConfig(decay=1.0), 0, 1)
