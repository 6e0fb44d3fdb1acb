"""A small causal 3D VAE: 8x spatial and 4x temporal compression, first frame kept alone.

Pixel clips of T = 1 + 4k frames map to L = 1 + k latent frames. Every convolution pads time
on the past side only, so latent frame j depends on pixel frames 0..4j and nothing later; that
is what lets long clips be encoded chunk by chunk with a cache of each convolution's past.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omni_train.contracts import (
    SPATIAL_STRIDE,
    TEMPORAL_STRIDE,
    check_pixel_frames,
    is_causal_frame_count,
    latent_frames,
    pixel_frames,
)
from omni_train.models.config import VAEConfig

# Each causal convolution's past input frames, keyed by the convolution, carried across chunks.
ConvCache = dict[int, Tensor]


def check_video_shape(video: Tensor, in_channels: int) -> None:
    if video.ndim != 5 or video.shape[1] != in_channels:
        raise ValueError(f"expected video (B, {in_channels}, T, H, W), got {tuple(video.shape)}")
    check_pixel_frames(video.shape[2])
    height, width = video.shape[-2:]
    if height % SPATIAL_STRIDE or width % SPATIAL_STRIDE:
        raise ValueError(
            f"the causal VAE needs height and width that are multiples of {SPATIAL_STRIDE}, "
            f"got {height}x{width}; resize or crop to "
            f"{height - height % SPATIAL_STRIDE}x{width - width % SPATIAL_STRIDE}"
        )


def norm_groups(channels: int) -> int:
    """Largest divisor of ``channels`` that is at most 32 and leaves >= 4 channels per group."""
    limit = max(1, min(32, channels // 4))
    return next(g for g in range(limit, 0, -1) if channels % g == 0)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm over each frame on its own: statistics never mix time, so it stays causal."""

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, frames, height, width = x.shape
        per_frame = x.transpose(1, 2).reshape(batch * frames, channels, height, width)
        normed = super().forward(per_frame)
        return normed.reshape(batch, frames, channels, height, width).transpose(1, 2)


class CausalConv3d(nn.Module):
    """Conv3d whose time axis is padded with copies of the first frame, on the past side only.

    With a cache, the past comes from the previous chunk instead: it keeps the last
    ``kernel_t - stride_t`` padded input frames, the overlap the next chunk's windows need.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: tuple[int, int, int] = (1, 1, 1),
    ) -> None:
        super().__init__()
        self.time_kernel = kernel_size
        self.time_stride = stride[0]
        self.conv = nn.Conv3d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=(0, kernel_size // 2, kernel_size // 2),
        )

    def forward(self, x: Tensor, cache: ConvCache | None = None) -> Tensor:
        past = cache.get(id(self)) if cache is not None else None
        if past is None:
            past = x[:, :, :1].expand(-1, -1, self.time_kernel - 1, -1, -1)
        padded = torch.cat([past, x], dim=2)
        if cache is not None:
            keep = self.time_kernel - self.time_stride
            # A copy: a view would keep the whole padded chunk alive until the next chunk.
            cache[id(self)] = padded[:, :, padded.shape[2] - keep :].detach().clone()
        return self.conv(padded)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = FrameGroupNorm(norm_groups(in_channels), in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = FrameGroupNorm(norm_groups(out_channels), out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, cache: ConvCache | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(F.silu(self.norm2(h)), cache)
        return h + (self.skip(x) if self.skip is not None else x)


class Downsample(nn.Module):
    """Halves height and width, and optionally time: frames (0), (1, 2), (3, 4)... -> 0, 1, 2."""

    def __init__(self, channels: int, halve_time: bool) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, channels, stride=(2 if halve_time else 1, 2, 2))

    def forward(self, x: Tensor, cache: ConvCache | None = None) -> Tensor:
        return self.conv(x, cache)


class Upsample(nn.Module):
    """Doubles height and width, and optionally time (the clip's first frame stays single).

    With a cache, only the first chunk holds the clip's first frame; the cache remembers
    that this layer has started.
    """

    def __init__(self, channels: int, double_time: bool) -> None:
        super().__init__()
        self.double_time = double_time
        self.conv = CausalConv3d(channels, channels)

    def forward(self, x: Tensor, cache: ConvCache | None = None) -> Tensor:
        if self.double_time:
            started = cache is not None and id(self) in cache
            if started:
                x = x.repeat_interleave(2, dim=2)
            else:
                x = torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(2, dim=2)], dim=2)
            if cache is not None:
                cache[id(self)] = x.new_empty(0)
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        return self.conv(x, cache)


def space_time_to_depth(x: Tensor) -> Tensor:
    """(B, C, 4L, H, W) -> (B, C * 4 * 8 * 8, L, H/8, W/8): each latent's pixel block as channels."""
    batch, channels, frames, height, width = x.shape
    t, s = TEMPORAL_STRIDE, SPATIAL_STRIDE
    blocks = x.reshape(batch, channels, frames // t, t, height // s, s, width // s, s)
    blocks = blocks.permute(0, 1, 3, 5, 7, 2, 4, 6)
    return blocks.reshape(batch, channels * t * s * s, frames // t, height // s, width // s)


def depth_to_space_time(x: Tensor, channels: int) -> Tensor:
    """The inverse of ``space_time_to_depth`` for ``channels`` pixel channels."""
    batch, _, latents, height, width = x.shape
    t, s = TEMPORAL_STRIDE, SPATIAL_STRIDE
    blocks = x.reshape(batch, channels, t, s, s, latents, height, width)
    blocks = blocks.permute(0, 1, 5, 2, 6, 3, 7, 4)
    return blocks.reshape(batch, channels, latents * t, height * s, width * s)


def _zero_init(conv: nn.Conv3d) -> None:
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)


def _first_chunk(module: nn.Module, cache: ConvCache | None) -> bool:
    """True unless a cache shows ``module`` has already seen an earlier chunk of this clip."""
    first = cache is None or id(module) not in cache
    if cache is not None:
        cache[id(module)] = torch.empty(0)
    return first


def _same_for_every_frame(weight: Tensor, channels: int, dim: int) -> None:
    """Give the 4 frame slots of a block (axis ``dim`` of ``weight``) the weights of the first:
    the map starts out blind to motion, so single-frame steps (which only see the first
    block) train all of it."""
    with torch.no_grad():
        slots = weight.unflatten(dim, (channels, TEMPORAL_STRIDE, -1))
        first = slots.narrow(dim + 1, 0, 1)
        slots.narrow(dim + 1, 1, TEMPORAL_STRIDE - 1).copy_(
            first.expand_as(slots.narrow(dim + 1, 1, TEMPORAL_STRIDE - 1))
        )


class PatchToLatent(nn.Module):
    """Each latent's pixel block (4 frames x 8 x 8; the clip's first frame, alone in its
    latent, repeated to fill a block) mapped linearly to latent channels."""

    def __init__(self, in_channels: int, latent_channels: int) -> None:
        super().__init__()
        # Inputs are divided by the pixels per block and channel: weights of order one, the
        # scale Adam's steps suit (a 1/256 mean weight would be wiped out by the first steps).
        self.pixels = TEMPORAL_STRIDE * SPATIAL_STRIDE**2
        self.proj = nn.Conv3d(in_channels * self.pixels, latent_channels, 1)
        nn.init.normal_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        _same_for_every_frame(self.proj.weight, in_channels, dim=1)
        # The first latent channels start as the block means of the pixel channels.
        with torch.no_grad():
            for channel in range(min(in_channels, latent_channels)):
                rows = self.proj.weight[channel].view(in_channels, -1)
                rows.zero_()
                rows[channel] = 1.0

    def forward(self, x: Tensor, cache: ConvCache | None = None) -> Tensor:
        if _first_chunk(self, cache):
            x = torch.cat([x[:, :, :1].expand(-1, -1, TEMPORAL_STRIDE - 1, -1, -1), x], dim=2)
        return self.proj(space_time_to_depth(x) / self.pixels)


class LatentToPatch(nn.Module):
    """Each latent mapped linearly to its pixel block; the first latent's block is averaged
    over its frames into the clip's first frame."""

    def __init__(self, latent_channels: int, out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        block = out_channels * TEMPORAL_STRIDE * SPATIAL_STRIDE**2
        self.proj = nn.Conv3d(latent_channels, block, 1)
        # It starts by spreading the first latent channels over their blocks as the pixel
        # channels (the rest at zero): the codec begins as block averaging, not noise.
        with torch.no_grad():
            columns = self.proj.weight[:, :, 0, 0, 0].view(out_channels, -1, latent_channels)
            columns.zero_()
            for channel in range(min(out_channels, latent_channels)):
                columns[channel, :, channel] = 1.0
            self.proj.bias.zero_()

    def forward(self, z: Tensor, cache: ConvCache | None = None) -> Tensor:
        first = _first_chunk(self, cache)
        pixels = depth_to_space_time(self.proj(z), self.out_channels)
        if not first:
            return pixels
        head = pixels[:, :, :TEMPORAL_STRIDE].mean(dim=2, keepdim=True)
        return torch.cat([head, pixels[:, :, TEMPORAL_STRIDE:]], dim=2)


def level_channels(cfg: VAEConfig) -> list[int]:
    return [cfg.base_channels * mult for mult in cfg.channel_mult]


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        channels = level_channels(cfg)
        self.conv_in = CausalConv3d(cfg.in_channels, channels[0])
        self.blocks = nn.ModuleList()
        current = channels[0]
        for level, width in enumerate(channels):
            for _ in range(cfg.num_res_blocks):
                self.blocks.append(ResBlock(current, width))
                current = width
            if level < len(channels) - 1:
                self.blocks.append(Downsample(current, level in cfg.temporal_down_levels))
        self.mid = ResBlock(current, current)
        self.norm_out = FrameGroupNorm(norm_groups(current), current)
        self.conv_out = CausalConv3d(current, 2 * cfg.latent_channels)
        self.shortcut = None
        if cfg.patch_shortcut:
            self.shortcut = PatchToLatent(cfg.in_channels, cfg.latent_channels)
            _zero_init(self.conv_out.conv)  # the network starts as a zero residual

    def forward(self, x: Tensor, cache: ConvCache | None = None) -> Tensor:
        h = self.conv_in(x, cache)
        for block in self.blocks:
            h = block(h, cache)
        h = self.mid(h, cache)
        moments = self.conv_out(F.silu(self.norm_out(h)), cache)
        if self.shortcut is None:
            return moments
        mean, logvar = moments.chunk(2, dim=1)
        return torch.cat([mean + self.shortcut(x, cache), logvar], dim=1)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        channels = level_channels(cfg)
        current = channels[-1]
        self.conv_in = CausalConv3d(cfg.latent_channels, current)
        self.mid = ResBlock(current, current)
        self.blocks = nn.ModuleList()
        for level in reversed(range(len(channels))):
            for _ in range(cfg.num_res_blocks):
                self.blocks.append(ResBlock(current, channels[level]))
                current = channels[level]
            if level > 0:
                self.blocks.append(Upsample(current, level - 1 in cfg.temporal_down_levels))
        self.norm_out = FrameGroupNorm(norm_groups(current), current)
        self.conv_out = CausalConv3d(current, cfg.in_channels)
        self.shortcut = None
        if cfg.patch_shortcut:
            self.shortcut = LatentToPatch(cfg.latent_channels, cfg.in_channels)
            _zero_init(self.conv_out.conv)

    def forward(self, z: Tensor, cache: ConvCache | None = None) -> Tensor:
        h = self.mid(self.conv_in(z, cache), cache)
        for block in self.blocks:
            h = block(h, cache)
        out = self.conv_out(F.silu(self.norm_out(h)), cache)
        return out if self.shortcut is None else out + self.shortcut(z, cache)


def check_vae_config(cfg: VAEConfig) -> None:
    levels = len(cfg.channel_mult)
    if 2 ** (levels - 1) != SPATIAL_STRIDE:
        raise ValueError(
            f"vae.channel_mult needs 4 levels (8x spatial compression), got {cfg.channel_mult}"
        )
    time_levels = sorted(set(cfg.temporal_down_levels))
    if len(time_levels) != 2 or not all(0 <= lvl < levels - 1 for lvl in time_levels):
        raise ValueError(
            "vae.temporal_down_levels needs two distinct levels among 0..2 (4x temporal "
            f"compression), got {cfg.temporal_down_levels}"
        )
    if cfg.chunk_frames < 0 or (
        cfg.chunk_frames > 0 and not is_causal_frame_count(cfg.chunk_frames)
    ):
        raise ValueError(f"vae.chunk_frames must be 0 or 1 + 4k (e.g. 17), got {cfg.chunk_frames}")
    for width in level_channels(cfg):
        if width < 1:
            raise ValueError(f"vae channel widths must be positive, got {level_channels(cfg)}")


class CausalVAE(nn.Module):
    """Video <-> scaled latents. ``encode`` returns the posterior mean (deterministic)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        check_vae_config(cfg)
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    latent_frames = staticmethod(latent_frames)
    pixel_frames = staticmethod(pixel_frames)

    def posterior(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """Unscaled (mean, logvar) of the latent posterior, each (B, C, L, H/8, W/8)."""
        check_video_shape(video, self.cfg.in_channels)
        moments = self._encode_moments(video)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def forward(
        self, video: Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Training pass over whole clips: (reconstruction, posterior mean, posterior logvar).

        The reconstruction decodes a posterior sample (``sample``) or the mean; nothing is
        scaled. Whole clips, not chunks: the chunk cache would cut gradients between chunks.
        """
        check_video_shape(video, self.cfg.in_channels)
        mean, logvar = self.encoder(video).chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean
        if sample:
            noise = torch.randn(
                mean.shape, generator=generator, device=mean.device, dtype=mean.dtype
            )
            z = mean + (0.5 * logvar).exp() * noise
        return self.decoder(z), mean, logvar

    def encode(self, video: Tensor) -> Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> scaled latents (B, C, 1 + (T-1)/4, H/8, W/8)."""
        mean, _ = self.posterior(video)
        return (mean - self.cfg.shift_factor) * self.cfg.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, C, L, h, w) -> video (B, 3, 1 + 4(L-1), 8h, 8w), not clamped."""
        return torch.cat(list(self.decode_chunks(latents)), dim=2)

    def decode_chunks(self, latents: Tensor) -> Iterator[Tensor]:
        """Decode in temporal chunks of ``chunk_frames`` pixel frames, yielding each as it is
        done: a caller that writes them out holds one chunk and the cache, whatever the length.
        The concatenated pieces equal the whole-clip decode."""
        if latents.ndim != 5 or latents.shape[1] != self.cfg.latent_channels:
            raise ValueError(
                f"expected latents (B, {self.cfg.latent_channels}, L, h, w), "
                f"got {tuple(latents.shape)}"
            )
        z = latents / self.cfg.scaling_factor + self.cfg.shift_factor
        chunk = self.cfg.chunk_frames
        if chunk <= 0:
            yield self.decoder(z)
            return
        # Latent chunks mirror the encoder's pixel chunks: 1 + k latents first, then k each.
        per_chunk = (chunk - 1) // TEMPORAL_STRIDE
        cache: ConvCache = {}
        for a, b in pairwise(chunk_bounds(z.shape[2], per_chunk + 1, per_chunk)):
            yield self.decoder(z[:, :, a:b], cache)

    def encode_chunks(self, video: Tensor) -> Iterator[Tensor]:
        """Scaled latents of ``video`` chunk by chunk (``chunk_frames`` pixel frames each)."""
        check_video_shape(video, self.cfg.in_channels)
        for moments in self._moment_chunks(video):
            mean, _ = moments.chunk(2, dim=1)
            yield (mean - self.cfg.shift_factor) * self.cfg.scaling_factor

    def _encode_moments(self, video: Tensor) -> Tensor:
        return torch.cat(list(self._moment_chunks(video)), dim=2)

    def _moment_chunks(self, video: Tensor) -> Iterator[Tensor]:
        chunk = self.cfg.chunk_frames
        if chunk <= 0:
            yield self.encoder(video)
            return
        # First chunk 1 + 4k frames, later ones 4k: chunk boundaries fall on latent boundaries.
        cache: ConvCache = {}
        for a, b in pairwise(chunk_bounds(video.shape[2], chunk, chunk - 1)):
            yield self.encoder(video[:, :, a:b], cache)


def chunk_bounds(length: int, first: int, rest: int) -> list[int]:
    """[0, first, first + rest, ..., length]: a first chunk, then equal ones, the last shorter."""
    if length <= first:
        return [0, length]
    return [0, *range(first, length, rest), length]


# Sizes that shape the weights: a VAE file fits a config only where these agree.
ARCH_FIELDS = (
    "in_channels",
    "latent_channels",
    "base_channels",
    "channel_mult",
    "temporal_down_levels",
    "num_res_blocks",
    "patch_shortcut",
)
# safetensors metadata keys written by omni_train.train_vae next to the weights.
META_ARCH = "omni_train.vae.arch"
META_SCALING = "omni_train.vae.scaling_factor"
META_SHIFT = "omni_train.vae.shift_factor"


def vae_arch(cfg: VAEConfig) -> dict[str, int | list[int]]:
    return {name: _plain(getattr(cfg, name)) for name in ARCH_FIELDS}


def _plain(value):
    if isinstance(value, bool):
        return value
    return int(value) if isinstance(value, int) else [int(v) for v in value]


def vae_file_metadata(cfg: VAEConfig, shift_factor: float, scaling_factor: float) -> dict[str, str]:
    """The header of a trained VAE file: its architecture and its latent normalisation."""
    return {
        META_ARCH: json.dumps(vae_arch(cfg), sort_keys=True),
        META_SHIFT: repr(float(shift_factor)),
        META_SCALING: repr(float(scaling_factor)),
    }


def _override(name: str, value) -> str:
    text = "[" + ",".join(str(v) for v in value) + "]" if isinstance(value, list) else str(value)
    return f"model.vae.{name}={text}"


def config_for_vae_file(cfg: VAEConfig, metadata: dict[str, str], source: str) -> VAEConfig:
    """``cfg`` checked against a VAE file's header, with the file's latent normalisation.

    A file whose architecture differs fails naming the overrides that fit it. The file's
    shift / scaling factors apply when the config leaves both at their defaults (0 and 1);
    factors set in the config win.
    """
    if META_ARCH not in metadata:
        return cfg
    saved = json.loads(metadata[META_ARCH])
    wanted = vae_arch(cfg)
    # Files written before a field existed were built at its default.
    saved = {**vae_arch(VAEConfig()), **saved}
    differ = [name for name in ARCH_FIELDS if saved[name] != wanted[name]]
    if differ:
        lines = [f"  {name}: file {saved[name]}, config {wanted[name]}" for name in differ]
        fix = " ".join(_override(name, saved[name]) for name in differ)
        raise ValueError(
            "\n".join(
                [f"the VAE in {source} has another architecture than model.vae:", *lines]
                + [f"set: {fix}"]
            )
        )
    defaults = VAEConfig()
    if cfg.scaling_factor != defaults.scaling_factor or cfg.shift_factor != defaults.shift_factor:
        return cfg
    return dataclasses.replace(
        cfg,
        scaling_factor=float(metadata.get(META_SCALING, cfg.scaling_factor)),
        shift_factor=float(metadata.get(META_SHIFT, cfg.shift_factor)),
    )
