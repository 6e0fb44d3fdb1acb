import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from omni_train.describe import DescribeConfig, describe
from omni_train.models.denoiser import build_denoiser
from omni_train.models.flops import train_flops_per_sample
from omni_train.testing import CONF_DIR

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ("tiny", "small", "1b", "4b", "7b")


def compose_describe(*overrides: str) -> DescribeConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        raw = compose(config_name="describe", overrides=list(overrides))
    return OmegaConf.to_object(raw)


def summary_of(*overrides: str) -> dict:
    return json.loads(describe(compose_describe("format=json", *overrides)))


@pytest.mark.parametrize(
    ("preset", "low", "high"),
    [
        ("tiny", 1e5, 1e6),
        ("small", 5e6, 5e7),
        ("1b", 0.8e9, 1.2e9),
        ("4b", 3.5e9, 4.5e9),
        ("7b", 6.5e9, 7.5e9),
    ],
)
def test_presets_have_their_advertised_size(preset, low, high):
    summary = summary_of(f"model={preset}")
    assert summary["model"] == preset
    assert low <= summary["trainable_params"] <= high
    assert summary["total_params"] == summary["trainable_params"] + summary["frozen_params"]
    parts = summary["components"]
    assert set(parts) == {
        "text_stream",
        "video_stream",
        "audio",
        "pose_guider",
        "vae",
        "text_encoder",
        "audio_encoder",
    }
    assert sum(p["params"] for p in parts.values()) == summary["total_params"]
    assert all(parts[name]["trainable"] == 0 for name in ("vae", "text_encoder", "audio_encoder"))
    assert all(p["params"] > 0 for p in parts.values())


def test_counts_match_the_built_tiny_model():
    cfg = compose_describe()
    summary = summary_of()
    model = build_denoiser(cfg.model)
    assert summary["trainable_params"] == sum(p.numel() for p in model.parameters())


def test_flops_follow_resolution_frames_and_text_tokens():
    cfg = compose_describe("model=small", "resolution=[256,256]", "num_frames=33", "text_tokens=77")
    summary = summary_of("model=small", "resolution=[256,256]", "num_frames=33", "text_tokens=77")
    assert summary["train_flops_per_sample"] == train_flops_per_sample(
        cfg.model, (256, 256), 33, 77
    )
    assert summary["tokens"]["latent_frames"] == 9 and summary["tokens"]["text_tokens"] == 77
    bigger = summary_of("model=small", "resolution=[512,512]", "num_frames=33", "text_tokens=77")
    assert bigger["train_flops_per_sample"] > 4 * summary["train_flops_per_sample"]


def test_presets_grow_in_cost():
    flops = [summary_of(f"model={p}")["train_flops_per_sample"] for p in PRESETS]
    assert flops == sorted(flops)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="num_frames"):
        describe(compose_describe("num_frames=16"))
    with pytest.raises(ValueError, match="format"):
        describe(compose_describe("format=yaml"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "omni_train.describe", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_table_names_every_component_and_the_clip():
    table = describe(compose_describe("model=1b", "resolution=[256,256]", "num_frames=33"))
    for text in ("text stream", "video stream", "pose guider", "VAE (frozen)", "TFLOP", "256x256"):
        assert text in table


def test_cli_prints_one_json_object_and_fails_clearly():
    result = run_cli("model=7b", "format=json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert {"total_params", "trainable_params", "train_flops_per_sample"} <= set(summary)
    bad = run_cli("num_frames=10")
    assert bad.returncode == 2 and "num_frames" in bad.stderr


FAMILY_COMPONENTS = {
    "base",
    "audio",
    "pose_guider",
    "other_new",
    "vae",
    "text_encoder",
    "audio_encoder",
}


@pytest.mark.parametrize("preset", ["wan_tiny", "hunyuan_video_tiny"])
def test_family_presets_split_base_and_new_modules_per_mode(preset):
    cfg = compose_describe(f"model={preset}")
    model = build_denoiser(cfg.model)
    new = sum(
        p.numel() for n, p in model.named_parameters() if n.startswith(model.new_module_prefixes)
    )
    total = sum(p.numel() for p in model.parameters())
    full = summary_of(f"model={preset}", "resolution=[32,32]", "num_frames=5", "text_tokens=4")
    assert set(full["components"]) == FAMILY_COMPONENTS
    assert full["components"]["base"]["params"] == total - new == full["parameters"]["base"]
    assert full["parameters"]["new_modules"] == new
    lora = summary_of(
        f"model={preset}",
        "resolution=[32,32]",
        "num_frames=5",
        "text_tokens=4",
        "finetune.mode=lora",
        "finetune.lora_rank=2",
    )
    adapters = lora["parameters"]["lora_adapters"]
    assert lora["components"]["base"]["trainable"] == 0
    assert lora["components"]["lora_adapters"]["trainable"] == adapters > 0
    denoiser_trainable = lora["trainable_params"]
    assert denoiser_trainable == new + adapters == lora["parameters"]["trainable"]["lora"]
    assert lora["train_flops_per_sample"] < full["train_flops_per_sample"]
    assert full["flops"]["denoiser"]["train"] == full["train_flops_per_sample"]


def test_family_table_names_its_backbone_and_modes():
    table = describe(
        compose_describe("model=wan_tiny", "resolution=[32,32]", "num_frames=5", "text_tokens=4")
    )
    for text in ("wan backbone (WanTransformer3DModel: 2 blocks", "base transformer", "lora"):
        assert text in table
