"""One rank, a few steps: the metrics row, validation clips, the profiler window, the lr."""

from __future__ import annotations

import io
import json
import math
import tarfile

import av
import pytest

from data_pipelines.testing import build_sample_shards, shard_members
from omni_train.data import build_loader
from omni_train.models.flops import train_flops_per_sample
from omni_train.models.text_encoder import TextEncoder
from omni_train.testing import compose_train_config, metric_rows, run_ranks, train_in_rank

pytestmark = pytest.mark.slow


def test_metrics_validation_clips_and_profiler_trace(tmp_path):
    data = build_sample_shards(tmp_path / "corpus", num_clips=3, seed=3)
    run_dir = tmp_path / "run"
    overrides = [
        "experiment=smoke",
        f"run_dir={run_dir}",
        f"data.shards={data}/shards/*.tar",
        "trainer.max_steps=4",
        "trainer.save_every=4",
        "trainer.zero_stage=2",
        "trainer.peak_tflops=0.05",
        # Longer than every caption: batches pad to their longest caption, not to this.
        "model.text_encoder.max_length=256",
        "trainer.optimizer.warmup_steps=1",
        "trainer.optimizer.schedule=cosine",
        "trainer.optimizer.min_lr_ratio=0.1",
        "trainer.optimizer.new_module_lr_scale=2.0",
        "trainer.validation.every=2",
        "trainer.validation.sampling_steps=1",
        "trainer.profiler.start_step=1",
        "trainer.profiler.num_steps=2",
        "logger.wandb.enabled=false",
    ]
    assert run_ranks(train_in_rank, 1, overrides) == [4]
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        for key in ("grad_norm", "tokens_per_s", "mfu", "mem_rss_gb", "data_wait_s"):
            assert math.isfinite(row[key]) and row[key] >= 0, key
        assert row["tokens_per_s"] > row["samples_per_s"]
        assert row["lr_new_modules"] == pytest.approx(2 * row["lr"])
        assert any(k.startswith("loss_task_") for k in row)
    cfg, _ = compose_train_config(overrides)
    tokenizer = TextEncoder(cfg.model.text_encoder).tokenize
    captions = [json.loads(m["json"])["caption"] for m in shard_members(data).values()]
    caption_lengths = {int(tokenizer([c])[1].sum()) for c in captions}
    assert max(caption_lengths) < cfg.model.text_encoder.max_length
    for row in rows:
        # One rank, one micro-batch: MFU is the formula at the step's own figures.
        assert row["text_tokens"] in caption_lengths  # the batch's longest caption
        flops = train_flops_per_sample(
            cfg.model, cfg.data.resolution, cfg.data.num_frames, int(row["text_tokens"])
        )
        assert row["peak_tflops"] == 0.05
        expected = flops * row["samples_per_s"] / (1 * row["peak_tflops"] * 1e12)
        assert row["mfu"] == pytest.approx(expected, rel=1e-12)
        assert row["tflops_per_s"] == pytest.approx(flops * row["samples_per_s"] / 1e12)
    lrs = [r["lr"] for r in rows]
    assert lrs[0] == pytest.approx(1e-3) and lrs == sorted(lrs, reverse=True)
    assert lrs[-1] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 3)))
    for step in (2, 4):
        clip = run_dir / "validation" / f"step_{step:08d}" / "clip_0.mp4"
        with av.open(str(clip)) as container:
            assert container.streams.audio
            assert sum(1 for _ in container.decode(video=0)) == 17
    traces = list((run_dir / "profile").glob("trace_rank0_steps1-2.json"))
    assert len(traces) == 1 and "traceEvents" in json.loads(traces[0].read_text())


def test_rows_count_the_samples_the_loader_skipped(tmp_path):
    data = build_sample_shards(tmp_path / "corpus", num_clips=3, seed=3)
    members = next(iter(shard_members(data).values()))
    with tarfile.open(data / "shards" / "broken.tar", "w") as tar:  # one mp4 that won't decode
        for name, payload in (("broken.mp4", b"\x00" * 300), ("broken.json", members["json"])):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    run_dir = tmp_path / "run"
    overrides = [
        "experiment=smoke",
        f"run_dir={run_dir}",
        f"data.shards={data}/shards/*.tar",
        "trainer.max_steps=4",
        "trainer.save_every=4",
        "logger.wandb.enabled=false",
    ]
    assert run_ranks(train_in_rank, 1, overrides) == [4]
    cfg, _ = compose_train_config(overrides)
    loader = build_loader(
        cfg.data, 0, 1, cfg.seed, curriculum=cfg.curriculum, grad_accum=cfg.trainer.grad_accum
    )
    batches = iter(loader)
    expected = []
    for _ in range(4):
        for _ in range(cfg.trainer.grad_accum):
            next(batches)
        expected.append(loader.corrupt_skipped)
    assert expected[-1] >= 1
    assert [r["corrupt_skipped"] for r in metric_rows(run_dir)] == expected
