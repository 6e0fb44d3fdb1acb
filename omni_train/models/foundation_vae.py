"""Public video VAEs from diffusers behind this project's VAE interface (adapters.py).

``model.vae=wan|hunyuan_video|cogvideox`` (conf/model.vae/*.yaml) builds AutoencoderKLWan,
AutoencoderKLHunyuanVideo or AutoencoderKLCogVideoX: from a local diffusers directory
(``model.vae.pretrained``: the VAE's own, or a pipeline's whose ``vae/`` is used) or, without
one, at random init from the class defaults updated by ``model.vae.diffusers_config``.

``encode`` returns the posterior mean normalised exactly as the family's diffusers pipelines
normalise the latents their transformer sees; ``decode`` undoes that normalisation and decodes.
Each formula cites the pipeline function it copies (diffusers 0.42.1, src/diffusers/pipelines/).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise
from typing import ClassVar

import torch
from torch import Tensor, nn

from omni_train.contracts import SPATIAL_STRIDE, TEMPORAL_STRIDE
from omni_train.models.config import VAEConfig
from omni_train.models.diffusers_loading import load_diffusers_model
from omni_train.models.vae import check_video_shape, chunk_bounds


def load_diffusers_vae(class_name: str, cfg: VAEConfig) -> nn.Module:
    """The VAE of ``model.vae.pretrained``, or a random-init one from ``diffusers_config``."""
    return load_diffusers_model(
        class_name,
        cfg.pretrained,
        cfg.diffusers_config,
        subfolder="vae",
        key="model.vae",
        wrong_class_hint="pick the model.vae preset of that family (wan, hunyuan_video or cogvideox)",
    )


class DiffusersVideoVAE(nn.Module):
    """A diffusers video VAE with this project's interface; a subclass per family gives the
    latent normalisation, the compression read from its config, the clip lengths it takes and,
    where chunks can equal the whole clip, the chunked loops."""

    class_name: ClassVar[str]
    preset: ClassVar[str]
    channels_key: ClassVar[str]
    # Chunks (model.vae.chunk_frames) have 1 + this many k pixel frames; 0 = no chunking.
    chunk_multiple: ClassVar[int] = 0

    def __init__(self, vae: nn.Module, cfg: VAEConfig) -> None:
        super().__init__()
        self.vae = vae
        self.cfg = cfg
        self.check_fits(cfg)

    @classmethod
    def build(cls, cfg: VAEConfig) -> DiffusersVideoVAE:
        return cls(load_diffusers_vae(cls.class_name, cfg), cfg)

    # What a family defines.
    def compression(self) -> tuple[int, int]:
        """(temporal, spatial) compression that the VAE's config builds."""
        raise NotImplementedError

    def normalize(self, latents: Tensor) -> Tensor:
        raise NotImplementedError

    def denormalize(self, latents: Tensor) -> Tensor:
        raise NotImplementedError

    def check_frames(self, num_frames: int) -> None:
        """Pixel frame counts this family encodes and decodes back to the same length."""

    def moment_chunks(self, video: Tensor, bounds: list[int]) -> Iterator[Tensor]:
        """The encoder's moments (mean and logvar on channels) of each ``bounds`` chunk, as
        diffusers' whole-clip encode computes them."""
        raise NotImplementedError

    def frame_chunks(self, z: Tensor, bounds: list[int]) -> Iterator[Tensor]:
        """Decoded frames of each ``bounds`` chunk of unnormalised latents ``z``."""
        raise NotImplementedError

    # The interface.
    @property
    def latent_channels(self) -> int:
        return int(self.vae.config[self.channels_key])

    def encode(self, video: Tensor) -> Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> normalised latents (B, 16, 1 + (T-1)/4, H/8, W/8)."""
        if self.cfg.chunk_frames > 0:
            return torch.cat(list(self.encode_chunks(video)), dim=2)
        self.check_video(video)
        # The posterior mean: what the pipelines' retrieve_latents(..., "argmax") returns.
        mean = self.vae.encode(video.to(self.vae.dtype)).latent_dist.mode()
        return self.normalize(mean)

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents (B, 16, L, h, w) -> video (B, 3, 1 + 4(L-1), 8h, 8w)."""
        if self.cfg.chunk_frames > 0:
            return torch.cat(list(self.decode_chunks(latents)), dim=2)
        self.check_latents(latents)
        z = self.denormalize(latents.to(self.vae.dtype))
        return self.vae.decode(z, return_dict=False)[0]

    def encode_chunks(self, video: Tensor) -> Iterator[Tensor]:
        """Normalised latents chunk by chunk (``chunk_frames`` pixel frames, then one fewer
        each), equal to the whole clip's; one chunk when chunk_frames is 0."""
        self.check_video(video)
        frames = video.shape[2]
        chunk = self.cfg.chunk_frames if self.cfg.chunk_frames > 0 else frames
        bounds = chunk_bounds(frames, chunk, chunk - 1)
        for moments in self.moment_chunks(video.to(self.vae.dtype), bounds):
            # DiagonalGaussianDistribution(moments).mode(): the first half of the channels.
            yield self.normalize(moments[:, : self.latent_channels])

    def decode_chunks(self, latents: Tensor) -> Iterator[Tensor]:
        """Video chunk by chunk, the first chunk's latents one more than the others' (as in the
        encoder's chunks), equal to the whole clip's decode."""
        self.check_latents(latents)
        length = latents.shape[2]
        chunk = self.cfg.chunk_frames if self.cfg.chunk_frames > 0 else 1 + 4 * length
        per_chunk = (chunk - 1) // TEMPORAL_STRIDE
        z = self.denormalize(latents.to(self.vae.dtype))
        yield from self.frame_chunks(z, chunk_bounds(length, per_chunk + 1, per_chunk))

    # Checks.
    def check_video(self, video: Tensor) -> None:
        check_video_shape(video, 3)
        self.check_frames(video.shape[2])

    def check_latents(self, latents: Tensor) -> None:
        channels = self.latent_channels
        if latents.ndim != 5 or latents.shape[1] != channels:
            raise ValueError(
                f"expected latents (B, {channels}, L, h, w), got {tuple(latents.shape)}"
            )
        self.check_frames(1 + (latents.shape[2] - 1) * TEMPORAL_STRIDE)

    def check_fits(self, cfg: VAEConfig) -> None:
        name = f"model.vae={self.preset}"
        if cfg.latent_channels != self.latent_channels:
            raise ValueError(
                f"{name}: the {self.class_name} has {self.latent_channels} latent channels but "
                f"model.vae.latent_channels={cfg.latent_channels}; set "
                f"model.vae.latent_channels={self.latent_channels}"
            )
        if self.compression() != (TEMPORAL_STRIDE, SPATIAL_STRIDE):
            temporal, spatial = self.compression()
            raise ValueError(
                f"{name}: this {self.class_name} compresses {temporal}x in time and {spatial}x in "
                f"space; the denoiser needs {TEMPORAL_STRIDE}x{SPATIAL_STRIDE}x{SPATIAL_STRIDE} "
                "(a 16x-space VAE such as Wan 2.2's does not fit)"
            )
        if (cfg.scaling_factor, cfg.shift_factor) != (1.0, 0.0):
            raise ValueError(
                f"{name}: model.vae.scaling_factor={cfg.scaling_factor} and "
                f"model.vae.shift_factor={cfg.shift_factor} are this project's VAE's; a diffusers "
                "VAE's normalisation comes from its own config.json, so leave them at 1.0 and 0.0"
            )
        chunk, multiple = cfg.chunk_frames, self.chunk_multiple
        if chunk and not multiple:
            raise ValueError(
                f"{name}: model.vae.chunk_frames={chunk}, but {self.class_name}'s group norms "
                "pool over every frame it encodes at once, so chunks would change the latents "
                "(diffusers' own frame tiling applies); set model.vae.chunk_frames=0"
            )
        if chunk < 0 or (chunk and (chunk <= multiple or (chunk - 1) % multiple)):
            raise ValueError(
                f"{name}: model.vae.chunk_frames must be 0 or 1 + {multiple}k with k >= 1 "
                f"(e.g. {1 + 4 * multiple}), got {chunk}"
            )


class WanVAE(DiffusersVideoVAE):
    """Wan 2.1's VAE. Its norms are per position and its attention per frame, so it is causal:
    diffusers encodes the first frame then 4 at a time, and decodes one latent frame at a time,
    with one cache of each convolution's past; chunks of 1 + 4k frames carry that cache on and
    give the whole clip's latents. Its decoder clamps the video to [-1, 1]."""

    class_name = "AutoencoderKLWan"
    preset = "wan"
    channels_key = "z_dim"
    chunk_multiple = TEMPORAL_STRIDE

    def check_fits(self, cfg: VAEConfig) -> None:
        config = self.vae.config
        for key in ("latents_mean", "latents_std"):
            if len(config[key]) != config.z_dim:
                raise ValueError(
                    f"model.vae=wan: the VAE config's {key} has {len(config[key])} values for "
                    f"z_dim={config.z_dim} channels; give one per channel"
                )
        super().check_fits(cfg)

    def compression(self) -> tuple[int, int]:
        config = self.vae.config
        spatial = 2 ** (len(config.dim_mult) - 1) * (config.patch_size or 1)
        return 2 ** sum(bool(down) for down in config.temperal_downsample), spatial

    def _mean_and_inverse_std(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        # As the pipelines build them: their "latents_std" is 1 / std, in the latents' dtype.
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(
            latents.device, latents.dtype
        )
        return mean, inverse_std

    def normalize(self, latents: Tensor) -> Tensor:
        # pipelines/wan/pipeline_wan_i2v.py, WanImageToVideoPipeline.prepare_latents:
        #   latent_condition = (latent_condition - latents_mean) * latents_std  (latents_std = 1/std)
        mean, inverse_std = self._mean_and_inverse_std(latents)
        return (latents - mean) * inverse_std

    def denormalize(self, latents: Tensor) -> Tensor:
        # pipelines/wan/pipeline_wan.py, WanPipeline.__call__, before vae.decode:
        #   latents = latents / latents_std + latents_mean                      (latents_std = 1/std)
        mean, inverse_std = self._mean_and_inverse_std(latents)
        return latents / inverse_std + mean

    def moment_chunks(self, video: Tensor, bounds: list[int]) -> Iterator[Tensor]:
        # The loop of AutoencoderKLWan._encode, cut at the chunk ends; quant_conv has a
        # one-frame kernel, so it may run per chunk.
        vae = self.vae
        vae.clear_cache()
        try:
            for a, b in pairwise(bounds):
                # The clip's first frame alone, every later frame in fours.
                starts = [0, *range(1, b, 4)] if a == 0 else range(a, b, 4)
                pieces = []
                for start in starts:
                    vae._enc_conv_idx = [0]
                    piece = video[:, :, start : 1 if start == 0 else start + 4]
                    pieces.append(
                        vae.encoder(piece, feat_cache=vae._enc_feat_map, feat_idx=vae._enc_conv_idx)
                    )
                yield vae.quant_conv(torch.cat(pieces, dim=2))
        finally:
            vae.clear_cache()

    def frame_chunks(self, z: Tensor, bounds: list[int]) -> Iterator[Tensor]:
        # The loop of AutoencoderKLWan._decode (one latent frame at a time), cut at the chunk
        # ends; post_quant_conv has a one-frame kernel.
        vae = self.vae
        vae.clear_cache()
        try:
            for a, b in pairwise(bounds):
                x = vae.post_quant_conv(z[:, :, a:b])
                frames = []
                for i in range(b - a):
                    vae._conv_idx = [0]
                    frames.append(
                        vae.decoder(
                            x[:, :, i : i + 1],
                            feat_cache=vae._feat_map,
                            feat_idx=vae._conv_idx,
                            first_chunk=a + i == 0,
                        )
                    )
                yield torch.clamp(torch.cat(frames, dim=2), min=-1.0, max=1.0)
        finally:
            vae.clear_cache()


class HunyuanVideoVAE(DiffusersVideoVAE):
    """HunyuanVideo's VAE. Its group norms pool over every frame it encodes at once (the whole
    clip up to 16 frames; above that diffusers encodes overlapping 17-frame tiles and blends
    them, as the reference pipelines run it), so chunks cannot equal the whole clip."""

    class_name = "AutoencoderKLHunyuanVideo"
    preset = "hunyuan_video"
    channels_key = "latent_channels"

    def compression(self) -> tuple[int, int]:
        config = self.vae.config
        return int(config.temporal_compression_ratio), int(config.spatial_compression_ratio)

    def normalize(self, latents: Tensor) -> Tensor:
        # pipelines/hunyuan_video/pipeline_hunyuan_video_image2video.py,
        # HunyuanVideoImageToVideoPipeline.prepare_latents:
        #   image_latents = image_latents * self.vae_scaling_factor  (= vae.config.scaling_factor)
        return latents * self.vae.config.scaling_factor

    def denormalize(self, latents: Tensor) -> Tensor:
        # pipelines/hunyuan_video/pipeline_hunyuan_video.py, HunyuanVideoPipeline.__call__:
        #   latents = latents / self.vae.config.scaling_factor
        return latents / self.vae.config.scaling_factor


class CogVideoXVAE(DiffusersVideoVAE):
    """CogVideoX's VAE. diffusers encodes in batches of 8 frames (the first 8 + T mod 8) and
    decodes pairs of latent frames (the first three when L is odd), with one cache of each
    convolution's past; its group norms pool within a batch only. An even number of latent
    frames decodes to 4 L frames, so clips have 1 + 8k frames, and chunks of 1 + 8k frames
    fall on batch ends and give the whole clip's latents.

    The pipelines keep latents frames-first (B, F, C, H, W) for the transformer; this interface
    keeps (B, C, F, H, W), and the scaling is elementwise, so the permute changes no value."""

    class_name = "AutoencoderKLCogVideoX"
    preset = "cogvideox"
    channels_key = "latent_channels"
    chunk_multiple = 8
    # AutoencoderKLCogVideoX.num_sample_frames_batch_size / num_latent_frames_batch_size.
    frame_batch = 8
    latent_batch = 2

    def compression(self) -> tuple[int, int]:
        config = self.vae.config
        return int(config.temporal_compression_ratio), 2 ** (len(config.block_out_channels) - 1)

    def check_frames(self, num_frames: int) -> None:
        if (num_frames - 1) % self.frame_batch:
            below = num_frames - (num_frames - 1) % self.frame_batch
            raise ValueError(
                f"model.vae=cogvideox needs clips of 1 + 8k frames (an odd number of latent "
                f"frames), got {num_frames}; use {below} or {below + self.frame_batch} "
                "(data.num_frames, the sampler's segment and motion frames)"
            )

    def normalize(self, latents: Tensor) -> Tensor:
        # pipelines/cogvideo/pipeline_cogvideox_video2video.py,
        # CogVideoXVideoToVideoPipeline.prepare_latents (after .permute(0, 2, 1, 3, 4)):
        #   init_latents = self.vae_scaling_factor_image * init_latents  (= vae.config.scaling_factor)
        # CogVideoX 1.5 I2V's invert_scale_latents divides its image condition instead
        # (pipeline_cogvideox_image2video.py); video latents are scaled alike in every pipeline.
        return self.vae.config.scaling_factor * latents

    def denormalize(self, latents: Tensor) -> Tensor:
        # pipelines/cogvideo/pipeline_cogvideox.py, CogVideoXPipeline.decode_latents:
        #   latents = 1 / self.vae_scaling_factor_image * latents
        return 1 / self.vae.config.scaling_factor * latents

    def moment_chunks(self, video: Tensor, bounds: list[int]) -> Iterator[Tensor]:
        # The batches of AutoencoderKLCogVideoX._encode: frames [0, 9), then 8 at a time.
        vae, conv_cache = self.vae, None
        for a, b in pairwise(bounds):
            first = self.frame_batch + 1 if a == 0 else self.frame_batch
            pieces = []
            for start, stop in pairwise(chunk_bounds(b - a, first, self.frame_batch)):
                h, conv_cache = vae.encoder(
                    video[:, :, a + start : a + stop], conv_cache=conv_cache
                )
                pieces.append(h if vae.quant_conv is None else vae.quant_conv(h))
            yield torch.cat(pieces, dim=2)

    def frame_chunks(self, z: Tensor, bounds: list[int]) -> Iterator[Tensor]:
        # The batches of AutoencoderKLCogVideoX._decode: latents [0, 3), then 2 at a time.
        vae, conv_cache = self.vae, None
        for a, b in pairwise(bounds):
            first = self.latent_batch + 1 if a == 0 else self.latent_batch
            frames = []
            for start, stop in pairwise(chunk_bounds(b - a, first, self.latent_batch)):
                x = z[:, :, a + start : a + stop]
                if vae.post_quant_conv is not None:
                    x = vae.post_quant_conv(x)
                out, conv_cache = vae.decoder(x, conv_cache=conv_cache)
                frames.append(out)
            yield torch.cat(frames, dim=2)


def build_wan_vae(cfg: VAEConfig) -> WanVAE:
    return WanVAE.build(cfg)


def build_hunyuan_video_vae(cfg: VAEConfig) -> HunyuanVideoVAE:
    return HunyuanVideoVAE.build(cfg)


def build_cogvideox_vae(cfg: VAEConfig) -> CogVideoXVAE:
    return CogVideoXVAE.build(cfg)


FAMILIES: dict[str, type[DiffusersVideoVAE]] = {
    family.preset: family for family in (WanVAE, HunyuanVideoVAE, CogVideoXVAE)
}
