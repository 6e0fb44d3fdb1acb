from __future__ import annotations

import pytest
import torch
from torch import nn

from omni_train.models.weights import (
    WeightsMismatch,
    load_state_dict_file,
    load_strict,
    save_safetensors,
)


def small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_round_trip_restores_exact_weights(tmp_path):
    torch.manual_seed(0)
    source, target = small_net(), small_net()
    path = tmp_path / "net.safetensors"
    save_safetensors(source.state_dict(), path, metadata={"kind": "test"})
    load_strict(target, path, "net")
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.safetensors"]


def test_save_accepts_views_and_shared_storage(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    path = tmp_path / "views.safetensors"
    save_safetensors({"full": base, "transposed": base.t(), "row": base[1]}, path)
    loaded = load_state_dict_file(path)
    assert torch.equal(loaded["transposed"], base.t())
    assert torch.equal(loaded["row"], base[1])


def test_save_replaces_existing_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors({"x": torch.zeros(2)}, path)
    save_safetensors({"x": torch.ones(3)}, path)
    assert torch.equal(load_state_dict_file(path)["x"], torch.ones(3))


def test_missing_file_error_names_path(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        load_state_dict_file(path)


def test_pickle_file_is_refused_with_path(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"x": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match=r"weights\.pt.*safetensors"):
        load_state_dict_file(path)


def test_mismatch_message_lists_missing_unexpected_and_shapes(tmp_path):
    state = small_net().state_dict()
    del state["2.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["0.weight"] = torch.zeros(5, 3)
    path = tmp_path / "broken.safetensors"
    save_safetensors(state, path)
    target = small_net()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsMismatch) as caught:
        load_strict(target, path, "toy VAE")
    message = str(caught.value)
    assert "toy VAE" in message and str(path) in message
    assert "missing keys (1)" in message and "2.bias" in message
    assert "unexpected keys (1)" in message and "extra.weight" in message
    assert "shape mismatches (1)" in message and "(4, 3)" in message and "(5, 3)" in message
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())


def test_mismatch_listing_is_capped_with_count():
    module = nn.ModuleList([nn.Linear(1, 1) for _ in range(15)])
    with pytest.raises(WeightsMismatch, match=r"missing keys \(30\)[\s\S]*and 20 more"):
        load_strict(module, {}, "many layers")


def test_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match="in-memory"):
        load_strict(small_net(), {"nope": torch.zeros(1)}, "net")


def test_export_for_inference_casts_and_reloads_strictly(tmp_path):
    from omni_train.models.config import ModelConfig
    from omni_train.models.denoiser import build_denoiser
    from omni_train.models.weights import export_for_inference, read_metadata

    torch.manual_seed(0)
    model = build_denoiser(ModelConfig())
    path = export_for_inference(model, tmp_path / "denoiser.safetensors", "bfloat16", {"a": "b"})
    stored = load_state_dict_file(path)
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert read_metadata(path) == {"format": "pt", "dtype": "bfloat16", "a": "b"}
    fresh = build_denoiser(ModelConfig())
    load_strict(fresh, path, "denoiser")
    for name, param in fresh.state_dict().items():
        assert param.dtype == torch.float32
        torch.testing.assert_close(param, model.state_dict()[name], rtol=1e-2, atol=1e-2)
    full = export_for_inference(model, tmp_path / "full.safetensors", "float32")
    load_strict(fresh, full, "denoiser")
    for name, param in fresh.state_dict().items():
        assert torch.equal(param, model.state_dict()[name])
    with pytest.raises(ValueError, match="dtype"):
        export_for_inference(model, tmp_path / "x.safetensors", "int8")
