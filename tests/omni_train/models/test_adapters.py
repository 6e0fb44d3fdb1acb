import sys
import types

import pytest
import torch
from torch import nn

from omni_train.models.adapters import AdapterError
from omni_train.models.config import ModelConfig
from omni_train.models.encoders import build_frozen_encoders
from omni_train.testing import compose_train_config


class MeanPoolVAE(nn.Module):
    """Another 'VAE': 8x spatial average pooling, first frame alone then 4 frames per latent."""

    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Conv3d(3, cfg.latent_channels, 1)
        self.back = nn.Conv3d(cfg.latent_channels, 3, 1)

    def encode(self, video):
        first = video[:, :, :1]
        rest = video[:, :, 1:].unflatten(2, (-1, 4)).mean(dim=3)
        pooled = nn.functional.avg_pool3d(torch.cat([first, rest], dim=2), (1, 8, 8))
        return self.proj(pooled)

    def decode(self, latents):
        frames = torch.cat([latents[:, :, :1], latents[:, :, 1:].repeat_interleave(4, 2)], 2)
        return nn.functional.interpolate(self.back(frames), scale_factor=(1, 8, 8))


class BagOfBytesText(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dim = cfg.d_model
        self.embed = nn.Embedding(256, cfg.d_model)

    def forward(self, captions):
        ids = [list(c.encode())[:8] or [0] for c in captions]
        width = max(len(i) for i in ids)
        mask = torch.tensor([[j < len(i) for j in range(width)] for i in ids])
        padded = torch.tensor([i + [0] * (width - len(i)) for i in ids])
        return self.embed(padded) * mask[..., None], mask


class WrongDimText(BagOfBytesText):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.dim = cfg.d_model + 1


@pytest.fixture
def plugin_module(monkeypatch):
    module = types.ModuleType("my_parts")
    module.MeanPoolVAE = MeanPoolVAE
    module.BagOfBytesText = BagOfBytesText
    module.WrongDimText = WrongDimText
    module.not_a_module = lambda cfg: object()
    monkeypatch.setitem(sys.modules, "my_parts", module)
    return module


def test_targets_from_hydra_overrides_replace_the_frozen_parts(plugin_module):
    cfg, _ = compose_train_config(
        [
            "run_dir=unused",
            "model.vae._target_=my_parts.MeanPoolVAE",
            "model.text_encoder._target_=my_parts.BagOfBytesText",
        ]
    )
    encoders = build_frozen_encoders(cfg.model)
    assert isinstance(encoders.vae, MeanPoolVAE) and isinstance(encoders.text, BagOfBytesText)
    assert not any(p.requires_grad for p in encoders.parameters())  # frozen like the defaults
    latents = encoders.encode_video(torch.rand(2, 3, 9, 32, 32) * 2 - 1)
    assert latents.shape == (2, cfg.model.vae.latent_channels, 3, 4, 4)
    assert encoders.decode_video(latents).shape == (2, 3, 9, 32, 32)
    text, mask = encoders.encode_text(["hello", "a much longer caption"])
    assert text.shape == (2, 8, cfg.model.text_encoder.d_model) and mask[0].sum() == 5


def test_the_project_classes_are_valid_targets():
    cfg = ModelConfig()
    cfg.vae._target_ = "omni_train.models.vae.CausalVAE"
    cfg.audio_encoder._target_ = "omni_train.models.audio_encoder.AudioEncoder"
    encoders = build_frozen_encoders(cfg)
    features = encoders.encode_audio(torch.randn(1, 16_000), 9)
    assert features.shape == (1, 9, cfg.audio_encoder.feature_dim)


@pytest.mark.parametrize(
    ("key", "target", "message"),
    [
        ("vae", "torch.nn.Identity", r"without \['encode', 'decode'\]"),
        ("vae", "my_parts.not_a_module", "not an nn.Module"),
        ("vae", "my_parts.NoSuchThing", "cannot be imported"),
        ("text_encoder", "my_parts.WrongDimText", "d_model is 32"),
    ],
)
def test_bad_targets_are_named_with_the_fix(plugin_module, key, target, message):
    cfg = ModelConfig()
    getattr(cfg, key)._target_ = target
    with pytest.raises(AdapterError, match=message) as info:
        build_frozen_encoders(cfg)
    assert f"model.{key}._target_" in str(info.value)
