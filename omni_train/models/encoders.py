"""The frozen parts of the model in one module: causal VAE, text encoder, audio encoder."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from omni_train.models.adapters import build_part
from omni_train.models.audio_encoder import AudioEncoder
from omni_train.models.config import ModelConfig, VAEConfig
from omni_train.models.text_encoder import TextEncoder
from omni_train.models.vae import CausalVAE, config_for_vae_file
from omni_train.models.weights import WeightsMismatch, load_strict, read_metadata


class FrozenEncoders(nn.Module):
    """Always in eval mode, never requiring grad; every method runs under ``torch.no_grad``."""

    def __init__(self, vae: nn.Module, text: nn.Module, audio: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.text = text
        self.audio = audio
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenEncoders:
        # A parent's .train() reaches here; dropout and wav2vec2 masking must stay off.
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @torch.no_grad()
    def encode_video(self, video: Tensor) -> Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> scaled latents (B, C, 1 + (T-1)/4, H/8, W/8).

        Inputs are cast to the encoders' dtype (bf16 when kept in bf16) and outputs come back
        in the input's floating dtype, so callers never see the storage dtype."""
        return self.vae.encode(video.to(self.dtype)).to(video.dtype)

    @torch.no_grad()
    def decode_video(self, latents: Tensor) -> Tensor:
        """Scaled latents -> (B, 3, T, H, W), unclamped."""
        return self.vae.decode(latents.to(self.dtype)).to(latents.dtype)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Captions -> (embeddings (B, Ltok, D) float32, bool mask (B, Ltok))."""
        embeddings, mask = self.text(captions)
        return embeddings.float(), mask

    @torch.no_grad()
    def encode_audio(self, waveform: Tensor, num_frames: int) -> Tensor:
        """(B, samples) at 16 kHz -> (B, num_frames, feature_dim)."""
        return self.audio(waveform.to(self.dtype), num_frames).to(waveform.dtype)


def build_vae(cfg: VAEConfig) -> CausalVAE:
    """This project's VAE; a file from omni_train.train_vae also brings its latent shift and
    scale (used when model.vae leaves them at 0 and 1) and fails early on another shape."""
    if not cfg.pretrained:
        return CausalVAE(cfg)
    path = Path(cfg.pretrained)
    if not path.is_file():
        raise FileNotFoundError(
            f"model.vae.pretrained={cfg.pretrained}: no such file; give the vae.safetensors "
            "written by omni_train.train_vae (or another safetensors state dict of this VAE)"
        )
    try:
        metadata = read_metadata(path)
    except Exception as err:  # noqa: BLE001 - any unreadable header gets the same message
        raise ValueError(
            f"model.vae.pretrained={cfg.pretrained} is not a readable safetensors file ({err})"
        ) from err
    try:
        fitted = config_for_vae_file(cfg, metadata, str(path))
    except ValueError as err:
        raise WeightsMismatch(str(err)) from None
    vae = CausalVAE(fitted)
    load_strict(vae, path, "VAE")
    return vae


def build_frozen_encoders(cfg: ModelConfig) -> FrozenEncoders:
    """Build the three frozen parts; each loads its weights when its ``pretrained`` is set.

    A part whose config sets ``_target_`` is built by that adapter instead
    (omni_train/models/adapters.py), which loads its own weights.
    """
    vae = build_part("vae", cfg.vae, build_vae)
    text = build_part("text_encoder", cfg.text_encoder, TextEncoder)
    audio = build_part("audio_encoder", cfg.audio_encoder, AudioEncoder)
    return FrozenEncoders(vae, text, audio)


def frozen_is_random(cfg: ModelConfig) -> bool:
    """True when any frozen part is random-init, so its weights must travel with checkpoints."""
    parts = (cfg.vae.pretrained, cfg.text_encoder.pretrained, cfg.audio_encoder.pretrained)
    return not all(parts)
