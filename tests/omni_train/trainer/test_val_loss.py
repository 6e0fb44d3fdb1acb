"""The validation loss: fixed clips, timesteps and noise; known answers with models whose
output is known; the same numbers on 1 rank and on 2 (ZeRO-3) ranks; EMA weights."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipelines.testing import build_sample_shards
from omni_train.data.shards import held_out, index_shard, shard_list
from omni_train.diffusion.config import DiffusionConfig
from omni_train.models.encoders import build_frozen_encoders
from omni_train.testing import compose_train_config, metric_rows, run_ranks, train_in_rank
from omni_train.trainer.val_loss import (
    Evaluation,
    ValLoss,
    clip_tasks,
    decode_val_sample,
    fixed_noise,
    fixed_timesteps,
    noise_seed,
    select_val_refs,
    summarize,
    task_active,
)
from omni_train.validate import ConfigError, validate_train_config

K = 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """4 samples: tags (text/ref/audio/pose) all strong; audio none x2; ref weak."""
    data = build_sample_shards(tmp_path_factory.mktemp("val_corpus"), num_clips=3, seed=3)
    return f"{data}/shards/*.tar"


class StubEngine:
    """What ValLoss needs of a DeepSpeed engine, around a plain function or module."""

    def __init__(self, fn, module: torch.nn.Module | None = None) -> None:
        self.fn = fn
        self.module = module or torch.nn.Module()

    def zero_optimization_partition_weights(self) -> bool:
        return False

    def __call__(self, x_t, t, **cond):
        return self.fn(x_t, t, **cond)


@pytest.fixture(scope="module")
def prepared(shards):
    """(cfg, encoders, ValLoss) over the 4 clips, prepared once for the module."""
    cfg, encoders, val = _setup(shards)
    val.prepare()
    return cfg, encoders, val


def _setup(shards: str, *overrides: str):
    cfg, _ = compose_train_config(
        [
            "experiment=smoke",
            "run_dir=unused",
            f"data.shards={shards}",
            f"data.val_shards={shards}",
            f"trainer.val_loss.timesteps={K}",
            *overrides,
        ]
    )
    torch.manual_seed(cfg.seed)
    encoders = build_frozen_encoders(cfg.model).eval()
    val = ValLoss(
        cfg.trainer.val_loss, cfg.data, cfg.diffusion, encoders, 0, 1, torch.device("cpu")
    )
    return cfg, encoders, val


# ----------------------------------------------------------------------------- pure parts
def test_timesteps_are_the_quantiles_of_the_training_draw():
    uniform = fixed_timesteps(DiffusionConfig(timestep_sampling="uniform"), 4)
    assert uniform.tolist() == pytest.approx([0.125, 0.375, 0.625, 0.875])
    shifted = fixed_timesteps(DiffusionConfig(timestep_sampling="uniform", shift=3.0), 2)
    assert shifted.tolist() == pytest.approx([0.75 / 1.5, 2.25 / 2.5])  # 3t / (1 + 2t)
    logit = fixed_timesteps(DiffusionConfig(logit_mean=0.0, logit_std=1.0), 2)
    z = 0.6744897501960817  # standard normal quantile of 0.75
    assert logit.tolist() == pytest.approx([1 / (1 + math.exp(z)), 1 / (1 + math.exp(-z))])


def test_noise_is_fixed_per_key_and_timestep():
    noise = fixed_noise((2, 3), seed=5, key="abc", count=3)
    for k in range(3):
        expected = torch.randn(
            (2, 3), generator=torch.Generator().manual_seed(noise_seed(5, "abc", k))
        )
        assert torch.equal(noise[k], expected)
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[1], noise[2])
    assert torch.equal(noise, fixed_noise((2, 3), seed=5, key="abc", count=3))
    assert not torch.equal(noise, fixed_noise((2, 3), seed=5, key="abd", count=3))
    assert not torch.equal(noise, fixed_noise((2, 3), seed=6, key="abc", count=3))


def test_tasks_and_masks_follow_the_tags():
    all_strong = {"text": "strong", "ref": "strong", "audio": "strong", "pose": "strong"}
    tasks = ["text", "audio", "pose"]
    assert clip_tasks(all_strong, True, tasks) == tasks
    assert clip_tasks(all_strong, False, tasks) == ["text", "pose"]  # no track: no audio task
    assert clip_tasks({**all_strong, "pose": "none", "audio": "weak"}, True, tasks) == [
        "text",
        "audio",
    ]
    assert task_active("text", all_strong, True) == {
        "text": True,
        "ref": True,
        "audio": False,
        "pose": False,
    }
    assert task_active("audio", {**all_strong, "text": "none"}, True) == {
        "text": False,
        "ref": True,
        "audio": True,
        "pose": False,
    }
    # The pose task turns audio on only where audio is usable.
    assert task_active("pose", all_strong, False) == {
        "text": True,
        "ref": True,
        "audio": False,
        "pose": True,
    }


def test_summary_known_answers():
    evaluations = [
        Evaluation(0, "a", "text", "strong", (1.0, 3.0)),
        Evaluation(0, "a", "audio", "strong", (2.0, 2.0)),
        Evaluation(1, "b", "text", "weak", (5.0, 7.0)),
        Evaluation(1, "b", "audio", "weak", (4.0, 8.0)),
        Evaluation(2, "c", "audio", "strong", (0.0, 0.0)),
    ]
    out = summarize(list(reversed(evaluations)), [0.25, 0.75])
    assert out["val/loss_text"] == 4.0 and out["val/count_text"] == 2
    assert out["val/loss_text/strong"] == 2.0 and out["val/loss_text/weak"] == 6.0
    assert out["val/loss_audio"] == 16.0 / 6 and out["val/count_audio"] == 3
    assert out["val/loss_audio/strong"] == 1.0 and out["val/count_audio/strong"] == 2
    assert out["val/loss_audio/weak"] == 6.0 and out["val/count_audio/weak"] == 1
    assert out["val/loss"] == pytest.approx((4.0 + 16.0 / 6) / 2, rel=1e-15)
    assert out["val/loss_t0.250"] == pytest.approx((3.0 + 2.0) / 2, rel=1e-15)
    assert out["val/loss_t0.750"] == pytest.approx((5.0 + 10.0 / 3) / 2, rel=1e-15)
    assert out["val/num_clips"] == 3
    assert "val/loss_pose" not in out


def test_clips_are_the_first_val_shard_samples_or_the_first_held_out_ones(shards):
    cfg, _ = compose_train_config(
        ["run_dir=unused", f"data.shards={shards}", f"data.val_shards={shards}"]
    )
    every = [ref.key for shard in shard_list(shards) for ref in index_shard(shard)]
    assert [r.key for r in select_val_refs(cfg.data, 3)] == every[:3]
    cfg.data.val_shards, cfg.data.val_holdout = "", 0.5
    held = [key for key in every if held_out(key, 0.5)]
    assert held and [r.key for r in select_val_refs(cfg.data, 10)] == held
    cfg.data.val_holdout = 1e-9
    with pytest.raises(ValueError, match="no validation sample in the data.val_holdout"):
        select_val_refs(cfg.data, 10)


def test_validation_needs_held_out_data(shards):
    cfg, _ = compose_train_config(
        ["run_dir=unused", f"data.shards={shards}", "trainer.val_every=10"]
    )
    with pytest.raises(ConfigError, match="data.val_shards=.*or data.val_holdout"):
        validate_train_config(cfg, 1)
    cfg.data.val_holdout = 0.1
    validate_train_config(cfg, 1)
    cfg.trainer.val_loss.tasks = ["text", "lips"]
    with pytest.raises(ConfigError, match=r"trainer.val_loss.tasks=\['text', 'lips'\]"):
        validate_train_config(cfg, 1)


# ----------------------------------------------------------------------------- known answers
def _hand_losses(cfg, encoders, shards, prediction) -> dict[str, list[float]]:
    """Per key: the K losses of ``prediction(x0, noise, t)``, from a fresh decode and encode."""
    t = fixed_timesteps(cfg.diffusion, K)
    refs = [ref for shard in shard_list(shards) for ref in index_shard(shard)]
    out = {}
    for ref in refs[: cfg.trainer.val_loss.num_clips]:
        sample = decode_val_sample(ref, cfg.data, cfg.trainer.val_loss.noise_seed)
        x0 = encoders.encode_video(sample["video"][None])[0].double()
        noise = fixed_noise(x0.shape, cfg.trainer.val_loss.noise_seed, ref.key, K).double()
        losses = []
        for k in range(K):
            error = prediction(x0, noise[k], float(t[k])) - (noise[k] - x0)
            losses.append(float(error.square().mean()))
        out[ref.key] = losses
    return out


@pytest.mark.parametrize("model", ["zero", "noisy_input"])
def test_logged_losses_equal_the_hand_computed_ones(shards, prepared, model):
    cfg, encoders, val = prepared
    if model == "zero":
        engine = StubEngine(lambda x_t, t, **_: torch.zeros_like(x_t))
        hand = _hand_losses(cfg, encoders, shards, lambda x0, n, t: torch.zeros_like(x0))
    else:  # the model returns its input x_t = (1 - t) x0 + t noise
        engine = StubEngine(lambda x_t, t, **_: x_t)
        hand = _hand_losses(cfg, encoders, shards, lambda x0, n, t: (1 - t) * x0 + t * n)
    out = val.run(engine)
    per_clip = {key: float(np.mean(losses)) for key, losses in hand.items()}
    keys = list(hand)
    assert out["val/num_clips"] == 4 and out["val/count_text"] == 4
    assert out["val/loss_text"] == pytest.approx(np.mean(list(per_clip.values())), rel=1e-5)
    # Clips 1 and 2 have no usable audio (tag "none"): the audio task sees clips 0 and 3.
    assert out["val/count_audio"] == 2
    assert out["val/loss_audio"] == pytest.approx(
        np.mean([per_clip[keys[0]], per_clip[keys[3]]]), rel=1e-5
    )
    assert out["val/loss_pose"] == pytest.approx(out["val/loss_text"], rel=1e-5)
    assert out["val/loss"] == pytest.approx(
        np.mean([out["val/loss_text"], out["val/loss_audio"], out["val/loss_pose"]]), rel=1e-12
    )
    t = fixed_timesteps(cfg.diffusion, K).tolist()
    for k, value in enumerate(t):
        by_task = [
            np.mean([hand[key][k] for key in keys]),
            np.mean([hand[keys[0]][k], hand[keys[3]][k]]),
            np.mean([hand[key][k] for key in keys]),
        ]
        assert out[f"val/loss_t{value:.3f}"] == pytest.approx(np.mean(by_task), rel=1e-5)
    if model == "noisy_input":
        first, last = out[f"val/loss_t{t[0]:.3f}"], out[f"val/loss_t{t[-1]:.3f}"]
        assert first != pytest.approx(last, rel=1e-2)  # t reaches the model, paired with noise
    assert val.run(engine) == out  # a second evaluation: the same numbers exactly


def test_the_model_sees_the_task_masks(prepared):
    _, _, val = prepared
    seen = []

    def record(x_t, t, active, **_):
        seen.append({c: v.tolist() for c, v in active.items()})
        return torch.zeros_like(x_t)

    val.run(StubEngine(record))
    on = [True] * K
    off = [False] * K
    assert len(seen) == 4 + 2 + 4  # text on every clip, audio on 2, pose on 4
    assert seen[:3] == [
        {"text": on, "ref": on, "audio": off, "pose": off},
        {"text": on, "ref": on, "audio": on, "pose": off},
        {"text": on, "ref": on, "audio": on, "pose": on},
    ]


def test_a_rank_with_fewer_forwards_pads_with_dropped_repeats(prepared):
    # Under ZeRO-3 every rank must call the model as often as the busiest one.
    _, _, val = prepared
    calls = []

    def count(x_t, t, **_):
        calls.append(1)
        return torch.zeros_like(x_t)

    engine = StubEngine(count)
    plain = val.local_evaluations(engine)
    assert len(calls) == len(plain) == 10
    calls.clear()
    padded = val.local_evaluations(engine, forwards=13)
    assert len(calls) == 13 and padded == plain


# ----------------------------------------------------------------------------- in training
def _weights_engine(cfg, path: Path) -> StubEngine:
    from omni_train.models.denoiser import build_denoiser
    from omni_train.models.weights import load_state_dict_file

    denoiser = build_denoiser(cfg.model)
    state = load_state_dict_file(path)
    denoiser.load_state_dict({k: v for k, v in state.items() if k in denoiser.state_dict()})
    return StubEngine(denoiser, denoiser)


def _train_all_partitioned(overrides: list[str]) -> int:
    """train_in_rank with ZeRO-3 keeping no parameter gathered (the tiny model's would all
    fall under the persistence threshold): every forward then gathers collectively."""
    import omni_train.trainer.run_setup as trainer_module

    original = trainer_module.deepspeed_config

    def without_persistence(*args, **kwargs):
        config = original(*args, **kwargs)
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return config

    trainer_module.deepspeed_config = without_persistence
    return train_in_rank(overrides)


def _val_rows(run_dir: Path) -> dict[int, dict]:
    return {
        row["step"]: {k: v for k, v in row.items() if k.startswith("val/") and k != "val/time_s"}
        for row in metric_rows(run_dir)
        if any(k.startswith("val/") for k in row)
    }


def _overrides(shards: str, run_dir: Path, *extra: str) -> list[str]:
    return [
        "experiment=smoke",
        f"run_dir={run_dir}",
        f"data.shards={shards}",
        f"data.val_shards={shards}",
        "trainer.max_steps=2",
        "trainer.save_every=2",
        "trainer.val_every=2",
        "trainer.val_at_start=true",
        "trainer.val_loss.num_clips=2",
        f"trainer.val_loss.timesteps={K}",
        "logger.wandb.enabled=false",
        *extra,
    ]


@pytest.mark.slow
def test_two_zero3_ranks_log_what_one_process_computes_from_the_checkpoint(shards, tmp_path):
    run_dir = tmp_path / "run"
    overrides = _overrides(shards, run_dir, "trainer.zero_stage=3")
    # Rank 0's clip has 3 tasks, rank 1's 2: rank 1 pads with a dropped forward.
    assert run_ranks(_train_all_partitioned, 2, overrides) == [2, 2]
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "loss" not in rows[0] and rows[0]["stage"] == 1
    assert "loss" in rows[2] and "val/loss" in rows[2] and "val/loss" not in rows[1]
    logged = _val_rows(run_dir)
    assert sorted(logged) == [0, 2]
    assert logged[0]["val/num_clips"] == 2 and logged[0] != logged[2]
    # The same weights in one process, a plain module, no DeepSpeed: the same numbers.
    cfg, encoders, val = _setup(shards, "trainer.val_loss.num_clips=2")
    torch.manual_seed(cfg.seed)
    build_frozen_encoders(cfg.model)  # the trainer draws the denoiser's init after these
    from omni_train.models.denoiser import build_denoiser

    initial = build_denoiser(cfg.model)
    assert val.run(StubEngine(initial, initial)) == logged[0]
    trained = _weights_engine(cfg, run_dir / "checkpoints" / "step_00000002" / "model.safetensors")
    assert val.run(trained) == logged[2]


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_ema_weights_are_evaluated_when_asked(shards, tmp_path, zero_stage):
    # The average is never updated (update_every > steps), so it holds the initial weights:
    # step 2 evaluated with EMA must equal step 0, though training moved the weights.
    run_dir = tmp_path / "run"
    overrides = _overrides(
        shards,
        run_dir,
        "trainer.ema.enabled=true",
        "trainer.ema.update_every=1000",
        "trainer.val_loss.use_ema=true",
        "trainer.val_every=1",
        f"trainer.zero_stage={zero_stage}",
    )
    assert run_ranks(_train_all_partitioned, 2, overrides) == [2, 2]
    logged = _val_rows(run_dir)
    assert sorted(logged) == [0, 1, 2]
    assert logged[1] == logged[0] and logged[2] == logged[0]
    losses = [r["loss"] for r in metric_rows(run_dir) if "loss" in r]
    assert losses[0] != losses[1]


@pytest.mark.slow
def test_precomputed_shards_give_the_loss_of_their_stored_latents(tmp_path):
    import io

    from data_pipelines.encode import EncodeConfig, run_encode
    from data_pipelines.testing import shard_members

    data = build_sample_shards(tmp_path / "corpus", num_clips=3, seed=3)
    encoded = tmp_path / "encoded"
    run_encode(
        EncodeConfig(input_dir=str(data), output_dir=str(encoded), audio_features=True),
        ["experiment=smoke"],
    )
    pattern = f"{encoded}/shards/*.tar"
    _, _, val = _setup(pattern, "data.precomputed=true")
    out = val.run(StubEngine(lambda x_t, t, **_: torch.zeros_like(x_t)))
    members = shard_members(encoded)
    hand = []
    for key in [ref.key for shard in shard_list(pattern) for ref in index_shard(shard)]:
        x0 = torch.from_numpy(np.load(io.BytesIO(members[key]["latents.npy"]))).double()
        noise = fixed_noise(x0.shape, 0, key, K).double()
        hand.append(float((noise - x0).square().mean()))
    assert out["val/count_text"] == len(hand) == 4
    assert out["val/loss_text"] == pytest.approx(np.mean(hand), rel=1e-5)


def test_validation_sees_the_inputs_a_training_step_would_give_the_model(
    shards, prepared, monkeypatch
):
    # The same decoded clip, once through the training step's compute_loss (a batch of one
    # with the task's masks) and once through the validation loss: every active condition's
    # input, the clean latents and the masks reach the loss identically.
    import omni_train.trainer.step as step_module
    import omni_train.trainer.val_loss as val_module
    from omni_train.data.batch import collate
    from omni_train.trainer.val_loss import clip_losses, encode_clip

    cfg, encoders, _ = prepared
    seen: list[dict] = []

    def record(model, x0, noise, t, num_motion_latents, sequence_parallel=None, **cond):
        seen.append({"x0": x0[:1], **{k: v[:1] for k, v in cond.items() if k != "active"}})
        seen[-1]["active"] = {c: bool(v[0]) for c, v in cond["active"].items()}
        return torch.zeros(len(x0))

    monkeypatch.setattr(step_module, "sharded_flow_matching_loss", record)
    monkeypatch.setattr(val_module, "flow_matching_loss", record)
    inputs_of = {"text": "text", "ref": "ref_latents", "audio": "audio_features"}
    inputs_of["pose"] = "pose_heatmaps"
    device, sigma = torch.device("cpu"), cfg.data.pose_sigma
    compared = 0
    for ref in select_val_refs(cfg.data, 4):
        sample = decode_val_sample(ref, cfg.data, cfg.trainer.val_loss.noise_seed)
        clip = encode_clip(sample, encoders, device, sigma)
        for task in clip_tasks(clip.quality, clip.has_audio, ["text", "audio", "pose"]):
            flags = task_active(task, clip.quality, clip.has_audio)
            masks = {c: np.array([flags[c]]) for c in flags}
            generator = torch.Generator().manual_seed(0)
            seen.clear()
            step_module.compute_loss(
                None, encoders, collate([sample]), masks, 0, cfg.diffusion, generator, device, sigma
            )
            clip_losses(None, clip, task, torch.full((2,), 0.5), torch.zeros(2, 1), device)
            trained, validated = seen
            assert trained["active"] == validated["active"] == flags
            assert torch.equal(trained["x0"], validated["x0"])
            assert torch.equal(trained["text_mask"], validated["text_mask"])
            for cond, name in inputs_of.items():
                if flags[cond]:
                    assert torch.equal(trained[name], validated[name]), (ref.key, task, name)
            compared += 1
    assert compared == 10


@pytest.mark.parametrize("held", ["val_shards", "val_holdout"])
def test_sampled_validation_clips_come_from_the_held_out_clips(shards, tmp_path, held):
    from omni_train.trainer.validation import Validator

    source = f"data.val_shards={shards}" if held == "val_shards" else "data.val_holdout=0.5"
    cfg, _ = compose_train_config(
        [
            "experiment=smoke",
            f"run_dir={tmp_path}",
            f"data.shards={shards}",
            source,
            "trainer.validation.num_clips=2",
        ]
    )
    refs = select_val_refs(cfg.data, 2)
    inputs = Validator(cfg, tmp_path, None, None).inputs()
    assert len(inputs) == len(refs) > 0
    for (ref_image, audio, caption), ref in zip(inputs, refs, strict=True):
        sample = decode_val_sample(ref, cfg.data, cfg.trainer.val_loss.noise_seed)
        assert torch.equal(ref_image, sample["ref"][None]) and ref_image.shape[:2] == (1, 3)
        assert torch.equal(audio, sample["audio"]) and caption == sample["caption"]
