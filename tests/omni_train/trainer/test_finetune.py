"""trainer.finetune: the optimizer's groups per mode, that a frozen base stays bit-identical,
and (2 forked ranks, ZeRO-2 and ZeRO-3) that a LoRA run checkpoints only what trains, resumes
exactly, and samples and exports merged weights that compute what the training model did."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from data_pipelines.testing import build_sample_shards
from omni_train.models.config import ModelConfig
from omni_train.models.denoiser import build_denoiser
from omni_train.models.finetune import apply_finetune_mode, is_lora_parameter, trained_names
from omni_train.models.weights import load_state_dict_file, read_metadata, save_safetensors
from omni_train.testing import (
    compose_train_config,
    denoiser_inputs,
    metric_rows,
    pretrained_like,
    run_ranks,
)
from omni_train.trainer import checkpoint as ckpt
from omni_train.trainer.config import FinetuneConfig, OptimizerConfig, TrainerConfig
from omni_train.trainer.finetune import build_finetuned_denoiser, param_groups

RANK, ALPHA = 4, 8.0
LR, NEW_SCALE, LORA_SCALE = 1e-3, 0.5, 3.0
# The tiny denoiser's 35 new-module tensors, and LoRA's A and B on 13 linears.
NEW_MODULE_TENSORS, LORA_TENSORS = 37, 26
NEW_PREFIXES = tuple(build_denoiser(ModelConfig()).new_module_prefixes)


def _base() -> torch.nn.Module:
    torch.manual_seed(0)
    return pretrained_like(build_denoiser(ModelConfig()))


def _adapted(mode: str) -> torch.nn.Module:
    model = build_denoiser(ModelConfig())
    model.load_state_dict(_base().state_dict())
    return apply_finetune_mode(model, mode, RANK, ALPHA, 0.0)


def _groups(model: torch.nn.Module, mode: str) -> dict[str, tuple[float, list[str]]]:
    """{group name: (lr, parameter names)}."""
    names = {id(p): n for n, p in model.named_parameters()}
    opt = OptimizerConfig(lr=LR, new_module_lr_scale=NEW_SCALE, lora_lr_scale=LORA_SCALE)
    return {
        g["name"]: (g["lr"], [names[id(p)] for p in g["params"]])
        for g in param_groups(model, opt, mode)
    }


def test_param_groups_per_mode_hold_the_expected_names_and_lrs():
    model = _adapted("full")
    all_names = [n for n, _ in model.named_parameters()]
    groups = _groups(model, "full")
    assert list(groups) == ["backbone", "new_modules"]
    assert groups["backbone"][0] == LR and groups["new_modules"][0] == LR * NEW_SCALE
    new = groups["new_modules"][1]
    assert len(new) == NEW_MODULE_TENSORS
    assert groups["backbone"][1] == [n for n in all_names if n not in new]

    groups = _groups(_adapted("new_modules"), "new_modules")
    assert groups == {"new_modules": (LR * NEW_SCALE, new)}

    model = _adapted("lora")
    groups = _groups(model, "lora")
    assert list(groups) == ["lora", "new_modules"]
    assert groups["new_modules"] == (LR * NEW_SCALE, new)
    lora_lr, lora = groups["lora"]
    assert lora_lr == LR * LORA_SCALE and len(lora) == LORA_TENSORS
    assert lora == [n for n, _ in model.named_parameters() if ".lora_" in n]


def test_a_base_parameter_left_trainable_is_refused():
    model = _adapted("lora")
    model.backbone.final_layer.linear.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="mode=lora trains base parameters"):
        _groups(model, "lora")


@pytest.mark.parametrize("mode", ["new_modules", "lora"])
def test_a_few_steps_move_what_trains_and_leave_the_base_bit_identical(mode):
    torch.manual_seed(0)
    model = _adapted(mode)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Weight decay would move any base tensor that reached the optimizer, gradient or not.
    optimizer = torch.optim.AdamW(
        param_groups(model, OptimizerConfig(lr=LR), mode), lr=LR, weight_decay=0.1
    )
    inputs = denoiser_inputs(ModelConfig(), seed=1)
    target = torch.randn(inputs["noisy"].shape, generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        optimizer.zero_grad()
        (model(**inputs) - target).square().mean().backward()
        optimizer.step()
    trained = set(trained_names(model))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == trained  # every trained tensor moved, nothing else
    expected = NEW_MODULE_TENSORS + (LORA_TENSORS if mode == "lora" else 0)
    assert len(trained) == expected
    assert all(is_lora_parameter(n) or n.startswith(NEW_PREFIXES) for n in trained)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("mode", "qlora", r"trainer.finetune.mode='qlora': use one of full, new_modules, lora"),
        ("lora_rank", 0, r"trainer.finetune.lora_rank=0: use 1 or more"),
        ("lora_alpha", 0.0, r"trainer.finetune.lora_alpha=0.0: use a positive value"),
        ("lora_dropout", 1.0, r"trainer.finetune.lora_dropout=1.0: use a value in \[0, 1\)"),
    ],
)
def test_bad_finetune_settings_name_the_override(field, value, message):
    finetune = FinetuneConfig(mode="lora")
    setattr(finetune, field, value)
    with pytest.raises(ValueError, match=message):
        TrainerConfig(finetune=finetune).validate()


def test_a_negative_lr_scale_names_the_override():
    cfg = TrainerConfig(optimizer=OptimizerConfig(lora_lr_scale=-1.0))
    with pytest.raises(
        ValueError, match=r"trainer.optimizer.lora_lr_scale=-1.0: use a factor >= 0"
    ):
        cfg.validate()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["checkpoint=RUN"], "missing ['out']"),
        (["checkpoint=RUN", "out=m.safetensors", "merge=yes"], "unknown arguments ['merge=yes']"),
        (["checkpoint=RUN", "out=m.safetensors", "use_ema=yes"], "use_ema=yes: use true or false"),
    ],
)
def test_the_merged_export_command_names_a_bad_argument(argv, message, capsys):
    from omni_train.export_merged import main

    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- 2 ranks
STEPS = 4
# Audio from step 1, pose from step 2 (every sample eligible): every new module trains.
STAGES = [
    "curriculum.stages.1.start_step=1",
    "curriculum.stages.2.start_step=2",
    "curriculum.stages.1.ratios.audio=1.0",
    "curriculum.stages.2.ratios.pose=1.0",
]
# A checkpoint's DeepSpeed files on 2 ranks.
DS_FILES = {
    2: [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ],
    3: [
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ],
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    data = build_sample_shards(tmp_path_factory.mktemp("corpus"), num_clips=2, seed=0)
    return str(data / "shards" / "*.tar")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A stand-in for a pretrained base: the tiny denoiser with live (non-zero) gates."""
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    save_safetensors(_base().state_dict(), path)
    return path


def _overrides(
    run_dir: Path, shards: str, zero: int, mode: str, base: Path | None, steps: int = STEPS
) -> list[str]:
    return [
        "experiment=smoke",
        f"run_dir={run_dir}",
        f"data.shards={shards}",
        f"trainer.max_steps={steps}",
        "trainer.save_every=2",
        f"trainer.zero_stage={zero}",
        "trainer.ema.enabled=true",
        "trainer.ema.decay=0.5",
        "trainer.progress_bar=false",
        "logger.wandb.enabled=false",
        f"trainer.finetune.mode={mode}",
        f"trainer.finetune.lora_rank={RANK}",
        f"trainer.finetune.lora_alpha={ALPHA}",
        f"trainer.optimizer.lora_lr_scale={LORA_SCALE}",
        f"model.backbone.pretrained={base or ''}",
        *STAGES,
    ]


def _train_and_probe(overrides: list[str]) -> dict:
    """Train in this (forked) rank; then the training model's output on fixed inputs and, on
    the main rank, its full state."""
    import torch.distributed as dist

    from omni_train.trainer.trainer import Trainer
    from omni_train.trainer.weights import consolidated_state

    cfg, resolved = compose_train_config(overrides)
    trainer = Trainer(cfg, resolved)
    trainer.run()
    module = trainer.engine.module.eval()
    with torch.no_grad():  # every rank: ZeRO-3 gathers the parameters
        probe = module(**denoiser_inputs(cfg.model, seed=5))
    state = consolidated_state(trainer.engine, trainer.dist.is_main)
    dist.destroy_process_group()
    # numpy: torch tensors would travel as shared memory, gone when the rank exits.
    return {
        "step": trainer.global_step,
        "probe": probe.numpy(),
        "state": {n: t.numpy() for n, t in state.items()} if state is not None else None,
    }


def _tensors(result: dict) -> dict:
    """A rank's result with torch tensors again."""
    state = result["state"]
    return {
        **result,
        "probe": torch.from_numpy(result["probe"]),
        "state": {n: torch.from_numpy(a) for n, a in state.items()} if state else None,
    }


def _pt_tensors(checkpoint: Path) -> dict[str, dict]:
    """Per DeepSpeed file: its module's tensor names, its frozen-parameter entries and the
    numel of every tensor it holds."""
    from omni_train.trainer.checkpoint import weights_only_loads

    def numel(obj) -> int:
        if torch.is_tensor(obj):
            return obj.numel()
        if isinstance(obj, dict):
            return sum(numel(v) for v in obj.values())
        if isinstance(obj, list | tuple):
            return sum(numel(v) for v in obj)
        return 0

    out = {}
    for path in sorted(checkpoint.glob("*.pt")):
        with weights_only_loads():
            state = torch.load(path, map_location="cpu")
        out[path.name] = {
            "module": sorted(state.get("module") or {}),
            "frozen": state.get("frozen_param_fragments") or state.get("frozen_param_shapes"),
            "numel": numel(state),
        }
    return out


def _names(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return sorted(f.keys())


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def lora_runs(request, tmp_path_factory, shards, pretrained) -> dict:
    """An uninterrupted 4-step LoRA run (2 ranks) and one resumed from its step-2 checkpoint."""
    zero = request.param
    root = tmp_path_factory.mktemp(f"lora_zero{zero}")
    full, resumed = root / "full", root / "resumed"
    # Validation clips at the last step: sampled from the adapted model with its EMA.
    validation = ["trainer.validation.every=4", "trainer.validation.sampling_steps=1"]
    overrides = [*_overrides(full, shards, zero, "lora", pretrained), *validation]
    cfg, _ = compose_train_config(overrides)
    # Built here first, so the forked ranks find peft imported.
    trained = sorted(trained_names(build_finetuned_denoiser(cfg.model, cfg.trainer.finetune)))
    results = run_ranks(_train_and_probe, 2, overrides)
    assert [r["step"] for r in results] == [STEPS, STEPS]
    # The step-2 checkpoint as a stopped run leaves it; a new process resumes it.
    (resumed / "checkpoints").mkdir(parents=True)
    step2 = full / "checkpoints" / ckpt.checkpoint_name(2)
    shutil.copytree(step2, resumed / "checkpoints" / step2.name)
    again = run_ranks(
        _train_and_probe, 2, [*_overrides(resumed, shards, zero, "lora", pretrained), *validation]
    )
    assert [r["step"] for r in again] == [STEPS, STEPS]
    return {
        "zero": zero,
        "full": full,
        "resumed": resumed,
        "cfg": cfg,
        "result": _tensors(results[0]),
        "resumed_result": _tensors(again[0]),
        "trained": trained,
    }


@pytest.mark.slow
def test_a_resumed_lora_run_has_the_losses_of_an_uninterrupted_one(lora_runs):
    full = metric_rows(lora_runs["full"])
    resumed = metric_rows(lora_runs["resumed"])
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(resumed, full[2:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=0), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6, abs=0), a["step"]
        assert (a["lr"], a["lr_new_modules"]) == (b["lr"], b["lr_new_modules"])
        assert a["lr"] == pytest.approx(LORA_SCALE * a["lr_new_modules"])
    for run in ("full", "resumed"):
        assert (lora_runs[run] / "validation" / "step_00000004" / "clip_0.mp4").is_file()
    # Losses move with training: the run is not a no-op that resumes trivially.
    assert len({r["loss"] for r in full}) == STEPS
    torch.testing.assert_close(
        lora_runs["resumed_result"]["probe"], lora_runs["result"]["probe"], rtol=1e-6, atol=0
    )


@pytest.mark.slow
def test_a_lora_checkpoint_holds_what_trains_and_names_its_base(lora_runs, pretrained):
    trained = lora_runs["trained"]
    trained_numel = sum(
        t.numel() for n, t in lora_runs["result"]["state"].items() if n in set(trained)
    )
    for run in ("full", "resumed"):
        checkpoint = lora_runs[run] / "checkpoints" / ckpt.checkpoint_name(STEPS)
        assert ckpt.read_meta(checkpoint)["finetune_mode"] == "lora"
        files = _pt_tensors(checkpoint)
        assert list(files) == DS_FILES[lora_runs["zero"]]
        total = 0
        for name, content in files.items():
            total += content["numel"]
            assert not content["frozen"], name
            if "model_states" in name:
                assert content["module"] == trained, name
        # Weights (ZeRO-2) and Adam's fp32 copy and two moments of what trains, over 2 ranks,
        # plus a few step counters and padding: far from the frozen base.
        stored = trained_numel * (4 if lora_runs["zero"] == 2 else 3)
        assert stored <= total <= stored + 64, (total, stored)
        assert _names(checkpoint / "model.safetensors") == trained
        assert _names(checkpoint / "ema.safetensors") == trained
        metadata = read_metadata(checkpoint / "model.safetensors")
        assert metadata["finetune_mode"] == "lora"
        assert (metadata["base_model"], metadata["base_model_from"]) == (
            str(pretrained),
            "model.backbone.pretrained",
        )


@pytest.mark.slow
def test_training_moves_the_adapters_and_new_modules_only(lora_runs, pretrained):
    base = load_state_dict_file(pretrained)
    state = lora_runs["result"]["state"]
    trained = set(lora_runs["trained"])
    for name, value in state.items():
        if name in trained:
            continue
        plain = name.replace(".base_layer.", ".")
        assert torch.equal(value, base[plain]), name
    moved = [n for n in trained if n in base and not torch.equal(state[n], base[n])]
    assert len(moved) == NEW_MODULE_TENSORS
    lora_b = [n for n in trained if ".lora_B." in n]
    assert len(lora_b) == LORA_TENSORS // 2 and all(state[n].any() for n in lora_b)


@pytest.mark.slow
def test_sampling_loads_the_training_model_and_the_merged_export_matches(lora_runs, tmp_path):
    from omni_train.export_merged import main as export_merged_cli
    from omni_train.models.weights import load_strict
    from omni_train.runs import load_run

    checkpoint = lora_runs["full"] / "checkpoints" / ckpt.checkpoint_name(STEPS)
    torch.set_num_threads(1)  # the ranks' reduction order
    inputs = denoiser_inputs(lora_runs["cfg"].model, seed=5)
    run = load_run(checkpoint)
    with torch.no_grad():
        sampled = run.denoiser(**inputs)
    torch.testing.assert_close(sampled, lora_runs["result"]["probe"], rtol=1e-6, atol=1e-7)

    out = tmp_path / "merged.safetensors"
    export_merged_cli([f"checkpoint={checkpoint}", f"out={out}"])
    plain = load_strict(build_denoiser(lora_runs["cfg"].model), out, "merged").eval()
    with torch.no_grad():
        merged = plain(**inputs)
    torch.testing.assert_close(merged, sampled, rtol=1e-5, atol=1e-6)
    assert not any("lora" in name for name in _names(out))


# ----------------------------------------------------------------------------- random base
@pytest.mark.slow
def test_a_random_base_is_written_once_and_resumed_from_the_run_dir(shards, tmp_path):
    """new_modules with a random-init base, 1 rank: the run writes the base before training;
    a resume and sampling take the base from that file (here altered in between, so a base
    rebuilt from the seed would not match)."""
    from omni_train.models.encoders import build_frozen_encoders
    from omni_train.runs import load_run

    run_dir = tmp_path / "run"
    first = _overrides(run_dir, shards, 2, "new_modules", None, steps=2)
    assert run_ranks(_train_and_probe, 1, first)[0]["step"] == 2
    base_file = run_dir / "base_model.safetensors"
    cfg, _ = compose_train_config(first)
    torch.manual_seed(cfg.seed)
    build_frozen_encoders(cfg.model)
    initial = build_denoiser(cfg.model).state_dict()
    written = load_state_dict_file(base_file)
    assert sorted(written) == sorted(initial)
    assert all(torch.equal(written[n], initial[n]) for n in initial)
    checkpoint = run_dir / "checkpoints" / ckpt.checkpoint_name(2)
    new = sorted(n for n in initial if n.startswith(NEW_PREFIXES))
    assert _names(checkpoint / "model.safetensors") == new
    metadata = read_metadata(checkpoint / "model.safetensors")
    assert (metadata["base_model"], metadata["base_model_from"]) == (
        "../../base_model.safetensors",
        "run_dir",
    )

    altered = pretrained_like(build_denoiser(cfg.model), seed=9).state_dict()
    save_safetensors(altered, base_file)
    with pytest.raises(RuntimeError, match=r"saved with trainer.finetune.mode=new_modules"):
        run_ranks(_train_and_probe, 1, [*first, "trainer.finetune.mode=lora"])
    resumed = run_ranks(_train_and_probe, 1, _overrides(run_dir, shards, 2, "new_modules", None))
    resumed = [_tensors(resumed[0])]
    state = resumed[0]["state"]
    frozen = [n for n in initial if n not in new]
    assert all(torch.equal(state[n], altered[n]) for n in frozen)

    torch.set_num_threads(1)
    run = load_run(run_dir)
    assert run.checkpoint.name == ckpt.checkpoint_name(STEPS)
    loaded = run.denoiser.state_dict()
    assert all(torch.equal(loaded[n], state[n]) for n in initial)
    with torch.no_grad():
        sampled = run.denoiser(**denoiser_inputs(cfg.model, seed=5))
    torch.testing.assert_close(sampled, resumed[0]["probe"], rtol=1e-6, atol=1e-7)
