"""Waveform -> per-video-frame audio features with wav2vec2 (transformers).

The last ``feature_layers`` hidden states are concatenated per 20 ms step, then resampled
linearly from the 50 Hz feature rate to the clip's video frames over the same time span.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Wav2Vec2Config, Wav2Vec2Model

from omni_train.models.config import AudioEncoderConfig

CONV_KERNELS = (10, 3, 3, 3, 3, 2, 2)
CONV_STRIDES = (5, 2, 2, 2, 2, 2, 2)
# The conv stack's receptive field: shorter waveforms are zero-padded up to it.
MIN_SAMPLES = 400
NORM_EPS = 1e-7


def random_wav2vec2(cfg: AudioEncoderConfig) -> Wav2Vec2Model:
    config = Wav2Vec2Config(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        conv_dim=(cfg.conv_dim,) * len(CONV_KERNELS),
        conv_kernel=CONV_KERNELS,
        conv_stride=CONV_STRIDES,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embedding_groups=math.gcd(16, cfg.hidden_size),
        mask_time_prob=0.0,
        mask_feature_prob=0.0,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        final_dropout=0.0,
        layerdrop=0.0,
    )
    return Wav2Vec2Model(config)


def normalize_waveform(waveform: Tensor) -> Tensor:
    """Zero mean, unit variance per sample, as wav2vec2's feature extractor does."""
    mean = waveform.mean(dim=-1, keepdim=True)
    var = waveform.var(dim=-1, keepdim=True, unbiased=False)
    return (waveform - mean) / torch.sqrt(var + NORM_EPS)


def resample_features(features: Tensor, num_frames: int) -> Tensor:
    """(B, N, D) at the feature rate -> (B, num_frames, D) spanning the same time, linearly."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    resampled = F.interpolate(
        features.transpose(1, 2), size=num_frames, mode="linear", align_corners=False
    )
    return resampled.transpose(1, 2)


class AudioEncoder(nn.Module):
    """``forward(waveform (B, S) at 16 kHz, num_frames)`` -> (B, num_frames, feature_dim)."""

    def __init__(self, cfg: AudioEncoderConfig) -> None:
        super().__init__()
        if cfg.pretrained:
            self.model = Wav2Vec2Model.from_pretrained(cfg.pretrained, local_files_only=True)
            if self.model.config.hidden_size != cfg.hidden_size:
                raise ValueError(
                    f"audio encoder at {cfg.pretrained} has hidden size "
                    f"{self.model.config.hidden_size} but model.audio_encoder.hidden_size is "
                    f"{cfg.hidden_size}; set it to {self.model.config.hidden_size}"
                )
        else:
            self.model = random_wav2vec2(cfg)
        available = self.model.config.num_hidden_layers + 1
        if not 1 <= cfg.feature_layers <= available:
            raise ValueError(
                f"audio_encoder.feature_layers must be in 1..{available}, got {cfg.feature_layers}"
            )
        self.feature_layers = cfg.feature_layers

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size) * self.feature_layers

    def forward(self, waveform: Tensor, num_frames: int) -> Tensor:
        if waveform.ndim != 2:
            raise ValueError(f"expected waveform (B, samples), got {tuple(waveform.shape)}")
        param = next(self.model.parameters())
        audio = normalize_waveform(waveform.to(device=param.device, dtype=torch.float32))
        if audio.shape[1] < MIN_SAMPLES:
            audio = F.pad(audio, (0, MIN_SAMPLES - audio.shape[1]))
        outputs = self.model(audio.to(param.dtype), output_hidden_states=True)
        features = torch.cat(outputs.hidden_states[-self.feature_layers :], dim=-1)
        return resample_features(features, num_frames)
