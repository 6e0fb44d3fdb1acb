"""Condition embedders: timestep, audio tokens per latent frame, and the pose guider.

Latent time follows the causal VAE: latent frame 0 is pixel frame 0 alone, latent frame
j >= 1 covers pixel frames 4j-3 .. 4j, so T_pix = 1 + 4 (L - 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from omni_train.contracts import (
    CONDITIONS,
    SPATIAL_STRIDE,
    TEMPORAL_STRIDE,
    check_pixel_frames,
    latent_frames,
    pixel_frames,
)
from omni_train.models.config import PoseGuiderConfig


def sinusoidal_embedding(
    values: torch.Tensor, dim: int, max_period: float = 10_000.0
) -> torch.Tensor:
    """(B,) float -> (B, dim) [cos | sin] features over geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half
    )
    angles = values.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class TimestepEmbedding(nn.Module):
    """t in [0, 1] -> (B, hidden): sinusoidal features of 1000 t through a small MLP."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_embedding(timesteps * 1000.0, self.frequency_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def audio_window_indices(latent_frames: int, window: int) -> torch.Tensor:
    """(L, 4 + 2 window) pixel-frame indices feeding each latent frame's audio tokens.

    Frame 0's own group is pixel frame 0 repeated four times; every group is widened by
    ``window`` frames on each side, clamped to the clip.
    """
    group = torch.arange(TEMPORAL_STRIDE)
    rows = []
    for j in range(latent_frames):
        core = torch.zeros(TEMPORAL_STRIDE, dtype=torch.long) if j == 0 else 4 * j - 3 + group
        first, last = int(core[0]), int(core[-1])
        left = torch.arange(first - window, first)
        right = torch.arange(last + 1, last + 1 + window)
        rows.append(torch.cat([left, core, right]))
    return torch.stack(rows).clamp(0, pixel_frames(latent_frames) - 1)


class AudioProjector(nn.Module):
    """(B, T_pix, Da) audio features -> (B, L, K, hidden) audio tokens per latent frame."""

    def __init__(self, feature_dim: int, hidden_size: int, window: int) -> None:
        super().__init__()
        if window < 0:
            raise ValueError(f"dit.audio_window={window} must be >= 0")
        self.window = window
        self.tokens_per_frame = TEMPORAL_STRIDE + 2 * window
        self.mlp = nn.Sequential(
            nn.Linear(feature_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
        )
        self.slot_embedding = nn.Parameter(torch.randn(self.tokens_per_frame, hidden_size) * 0.02)

    def forward(
        self, features: torch.Tensor, frames: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """All latent frames' tokens, or those of latent frames ``frames`` = (start, stop)
        (a sequence-parallel rank's: the same values, only their windows projected)."""
        index = audio_window_indices(latent_frames(features.shape[1]), self.window)
        if frames is not None:
            index = index[frames[0] : frames[1]]
        windows = features[:, index.to(features.device)]  # (B, L, K, Da)
        return self.mlp(windows) + self.slot_embedding


def _causal_pad_time(x: torch.Tensor, frames: int) -> torch.Tensor:
    """Prepend copies of the first frame so a time kernel never sees the future."""
    if frames == 0:
        return x
    return torch.cat([x[:, :, :1].expand(-1, -1, frames, -1, -1), x], dim=2)


class CausalDownConv(nn.Module):
    """3x3x3 conv, spatial stride 2, time stride 1 or 2; output frame 0 sees input frame 0."""

    def __init__(self, in_channels: int, out_channels: int, time_stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(
            in_channels, out_channels, kernel_size=3, stride=(time_stride, 2, 2), padding=(0, 1, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_causal_pad_time(x, 2))


def stack_neighbor_frames(features: torch.Tensor, neighbors: int) -> torch.Tensor:
    """(B, C, L, h, w) -> (B, C (2n+1), L, h, w): frames j-n .. j+n on channels, zeros outside."""
    if neighbors == 0:
        return features
    frames = features.shape[2]
    padded = F.pad(features, (0, 0, 0, 0, neighbors, neighbors))
    shifted = [padded[:, :, offset : offset + frames] for offset in range(2 * neighbors + 1)]
    return torch.cat(shifted, dim=1)


class PoseGuider(nn.Module):
    """(B, keypoints, T_pix, H, W) heatmaps -> (B, out (2n+1), L, H/8, W/8) latent-grid features.

    Compresses like the VAE (first frame alone, 4x time, 8x space) with causal strided convs,
    then stacks each latent frame's features with its neighbours' (paper §3.1).
    """

    def __init__(self, cfg: PoseGuiderConfig) -> None:
        super().__init__()
        hidden = cfg.hidden_channels
        self.neighbor_frames = cfg.neighbor_frames
        self.out_channels = cfg.out_channels * (2 * cfg.neighbor_frames + 1)
        self.down = nn.ModuleList(
            [
                CausalDownConv(cfg.num_keypoints, hidden, time_stride=1),
                CausalDownConv(hidden, hidden, time_stride=2),
                CausalDownConv(hidden, hidden, time_stride=2),
            ]
        )
        self.proj_out = nn.Conv3d(hidden, cfg.out_channels, kernel_size=1)

    @property
    def history_latent_frames(self) -> int:
        """Latent frames before a latent frame that its features depend on (the causal convs'
        receptive field, in pixel frames, rounded up to latent frames)."""
        pixels, stride = 0, 1
        for down in self.down:
            pixels += (down.conv.kernel_size[0] - 1) * stride
            stride *= down.conv.stride[0]
        return -(-pixels // TEMPORAL_STRIDE)

    def forward(
        self, heatmaps: torch.Tensor, frames: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Features of every latent frame, or of latent frames ``frames`` = (start, stop)
        only: a sequence-parallel rank's, equal to those of the whole clip, computed from the
        pixel frames they depend on (their neighbours' and the convs' history; the clip's
        start and end pad as for the whole clip)."""
        check_pixel_frames(heatmaps.shape[2])
        if heatmaps.shape[-2] % SPATIAL_STRIDE or heatmaps.shape[-1] % SPATIAL_STRIDE:
            raise ValueError(
                f"pose heatmaps {tuple(heatmaps.shape)}: H and W must divide by {SPATIAL_STRIDE}"
            )
        total = latent_frames(heatmaps.shape[2])
        start, stop = (0, total) if frames is None else frames
        if not 0 <= start < stop <= total:
            raise ValueError(f"latent frames {start}:{stop} are not within the clip's {total}")
        n = self.neighbor_frames
        low, high = max(start - n, 0), min(stop + n, total)  # frames whose features are stacked
        # From a latent-frame boundary: the convs' outputs before ``low`` (whose history the
        # slice cuts) are dropped.
        first = max(low - self.history_latent_frames, 0)
        x = heatmaps[:, :, TEMPORAL_STRIDE * first : pixel_frames(high)]
        for conv in self.down:
            x = F.silu(conv(x))
        features = self.proj_out(x)[:, :, low - first :]
        if frames is None:
            return stack_neighbor_frames(features, n)
        # Zeros only beyond the clip's ends, as stack_neighbor_frames pads the whole clip.
        padded = F.pad(features, (0, 0, 0, 0, low - (start - n), stop + n - high))
        count = stop - start
        return torch.cat([padded[:, :, k : k + count] for k in range(2 * n + 1)], dim=1)


def condition_flags(
    active: dict[str, torch.Tensor], batch: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Per-sample on/off (B,) bool for every condition; a missing or misshapen one is an error."""
    missing = [name for name in CONDITIONS if name not in active]
    if missing:
        raise KeyError(f"active is missing conditions {missing}; give all of {CONDITIONS}")
    flags = {}
    for name in CONDITIONS:
        flag = torch.as_tensor(active[name], device=device).bool()
        if flag.shape != (batch,):
            raise ValueError(f"active[{name!r}] has shape {tuple(flag.shape)}, want ({batch},)")
        flags[name] = flag
    return flags


def pose_features(
    guider: PoseGuider,
    heatmaps: torch.Tensor | None,
    pose_on: torch.Tensor,
    latent_shape: torch.Size,
    dtype: torch.dtype,
    frames: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The pose guider's features on the latent grid, zero for samples with pose off (or none);
    of latent frames ``frames`` = (start, stop) only, when given (a sequence-parallel rank's)."""
    batch, _, total, height, width = latent_shape
    start, stop = (0, total) if frames is None else frames
    if heatmaps is None:
        zeros_shape = (batch, guider.out_channels, stop - start, height, width)
        return torch.zeros(zeros_shape, dtype=dtype, device=pose_on.device)
    if latent_frames(heatmaps.shape[2]) != total:
        raise ValueError(
            f"pose heatmaps {tuple(heatmaps.shape)} have {heatmaps.shape[2]} pixel frames; "
            f"{total} latent frames need {pixel_frames(total)}"
        )
    features = guider(heatmaps.to(dtype), frames)
    frames = stop - start
    if features.shape[2:] != (frames, height, width):
        raise ValueError(
            f"pose heatmaps {tuple(heatmaps.shape)} give features on a "
            f"{tuple(features.shape[2:])} grid, the latents are {(frames, height, width)}"
        )
    return features * pose_on.to(dtype)[:, None, None, None, None]


def audio_tokens(
    projector: AudioProjector,
    null_audio: torch.Tensor,
    features: torch.Tensor | None,
    audio_on: torch.Tensor,
    frames: int,
    dtype: torch.dtype,
    own_frames: tuple[int, int] | None = None,
) -> torch.Tensor:
    """(B, L, K, hidden) audio tokens per latent frame of the ``frames``-frame clip; the
    learned null where audio is off. Of latent frames ``own_frames`` = (start, stop) only,
    when given (a sequence-parallel rank's)."""
    start, stop = (0, frames) if own_frames is None else own_frames
    null = null_audio.expand(audio_on.shape[0], stop - start, -1, -1)
    if features is None:
        return null
    if latent_frames(features.shape[1]) != frames:
        raise ValueError(
            f"audio features have {features.shape[1]} pixel frames; {frames} latent frames "
            f"need {1 + 4 * (frames - 1)}"
        )
    tokens = projector(features.to(dtype), own_frames)
    return torch.where(audio_on[:, None, None, None], tokens, null)
