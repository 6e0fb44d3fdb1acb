"""Check a diffusers VAE with real weights against its pipelines' own latent handling.

    python -m omni_train.models.check_foundation_vae --family wan --pretrained DIR \
        [--video clip.mp4] [--frames 17] [--height 256] [--width 256] [--chunk-frames 9]

DIR is a local diffusers directory (a pipeline's, whose vae/ is used, or the VAE's own).
Encodes one clip (the first frames of --video, resized; a synthetic moving pattern without
one) with the project's wrapper (omni_train/models/foundation_vae.py) and with the pipelines'
code: their normalisation formulas written out here on diffusers' own encode/decode, and the
pipeline methods that hold the step (WanImageToVideoPipeline.prepare_latents,
HunyuanVideoImageToVideoPipeline.prepare_latents, CogVideoXPipeline.decode_latents). Prints
each max |difference| (0 when the wrapper matches), the reconstruction PSNR and the statistics
of the normalised latents (near mean 0, std 1 on real footage when the normalisation is right),
and exits with 1 when a difference exceeds --tolerance.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from omni_train.models.config import VAEConfig
from omni_train.models.foundation_vae import FAMILIES, DiffusersVideoVAE


def pipeline_normalised(family: str, vae, video: Tensor) -> Tensor:
    """The pipelines' latents of ``video`` (B, C, F, H, W), formulas as the pipelines write them."""
    mean = vae.encode(video).latent_dist.mode()
    config = vae.config
    if family == "wan":  # pipeline_wan_i2v.py, WanImageToVideoPipeline.prepare_latents
        latents_mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1)
        latents_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)
        return (mean - latents_mean.to(mean)) * latents_std.to(mean)
    if family == "hunyuan_video":  # pipeline_hunyuan_video_image2video.py, prepare_latents
        return mean * config.scaling_factor
    # pipeline_cogvideox_video2video.py, prepare_latents: frames-first there, same values.
    return (config.scaling_factor * mean.permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)


def pipeline_decoded(family: str, vae, latents: Tensor) -> Tensor:
    config = vae.config
    if family == "wan":  # pipeline_wan.py, WanPipeline.__call__
        latents_mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1)
        latents_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)
        z = latents / latents_std.to(latents) + latents_mean.to(latents)
    elif family == "hunyuan_video":  # pipeline_hunyuan_video.py, HunyuanVideoPipeline.__call__
        z = latents / config.scaling_factor
    else:  # pipeline_cogvideox.py, CogVideoXPipeline.decode_latents
        z = 1 / config.scaling_factor * latents
    return vae.decode(z, return_dict=False)[0]


def pipeline_method_gap(
    family: str, wrapper: DiffusersVideoVAE, video: Tensor
) -> tuple[str, float]:
    """Max |wrapper - pipeline method| where a pipeline method holds the step."""
    import diffusers

    vae, image = wrapper.vae, video[:1, :, 0]
    height, width, device = image.shape[-2], image.shape[-1], video.device
    if family == "wan":
        pipe = diffusers.WanImageToVideoPipeline(
            tokenizer=None, text_encoder=None, vae=vae, scheduler=None
        )
        frames = video.shape[2]
        _, condition = pipe.prepare_latents(
            image, 1, wrapper.latent_channels, height, width, frames, image.dtype, device
        )
        zeros = image.new_zeros(1, 3, frames - 1, height, width)
        ours = wrapper.encode(torch.cat([image[:, :, None], zeros], dim=2))
        return "WanImageToVideoPipeline.prepare_latents", _gap(condition[:, 4:], ours)
    if family == "hunyuan_video":
        pipe = diffusers.HunyuanVideoImageToVideoPipeline(
            text_encoder=None, tokenizer=None, transformer=None, vae=vae, scheduler=None,
            text_encoder_2=None, tokenizer_2=None, image_processor=None,
        )  # fmt: skip
        _, image_latents = pipe.prepare_latents(
            image, 1, wrapper.latent_channels, height, width, 1, image.dtype, device
        )
        ours = wrapper.encode(image[:, :, None])
        return "HunyuanVideoImageToVideoPipeline.prepare_latents", _gap(image_latents, ours)
    pipe = diffusers.CogVideoXPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=None, scheduler=None
    )
    latents = wrapper.encode(video[:1])
    theirs = pipe.decode_latents(latents.permute(0, 2, 1, 3, 4))
    return "CogVideoXPipeline.decode_latents", _gap(theirs, wrapper.decode(latents))


def _gap(a: Tensor, b: Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def synthetic_clip(frames: int, height: int, width: int) -> Tensor:
    """(1, 3, T, H, W) in [-1, 1]: colour gradients drifting, a bright square moving across."""
    t = torch.arange(frames, dtype=torch.float32)[:, None, None] / max(frames - 1, 1)
    y = torch.linspace(0, 1, height)[None, :, None]
    x = torch.linspace(0, 1, width)[None, None, :]
    red = 0.5 + 0.4 * torch.sin(2 * math.pi * (x + 0.3 * t))
    green = 0.5 + 0.4 * torch.cos(2 * math.pi * (y - 0.2 * t))
    blue = 0.5 + 0.3 * torch.sin(2 * math.pi * (x + y + 0.5 * t))
    shape = (frames, height, width)
    video = torch.stack([red.expand(shape), green.expand(shape), blue.expand(shape)]).clone()
    size = max(height // 6, 1)
    for i in range(frames):
        top, left = height // 3, int((width - size) * i / max(frames - 1, 1))
        video[:, i, top : top + size, left : left + size] = 0.95
    return video[None] * 2 - 1


def video_clip(path: str, frames: int, height: int, width: int) -> Tensor:
    from omni_train.media import read_video

    array = read_video(path)
    if len(array) < frames:
        raise ValueError(f"--video {path} has {len(array)} frames; --frames asks for {frames}")
    video = torch.from_numpy(array[:frames]).permute(0, 3, 1, 2).float() / 127.5 - 1
    video = F.interpolate(video, size=(height, width), mode="bilinear", antialias=True)
    return video.permute(1, 0, 2, 3)[None].clamp(-1, 1)


def psnr(reference: Tensor, output: Tensor) -> float:
    mse = ((reference - output.clamp(-1, 1)) / 2).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


def check(args: argparse.Namespace) -> list[str]:
    """The report lines; raises SystemExit(1) after printing when a difference is too large."""
    cfg = VAEConfig(pretrained=args.pretrained, latent_channels=16, chunk_frames=args.chunk_frames)
    family = FAMILIES[args.family]
    wrapper = family.build(cfg).to(args.device).eval()
    if args.video:
        video = video_clip(args.video, args.frames, args.height, args.width)
    else:
        video = synthetic_clip(args.frames, args.height, args.width)
    video = video.to(args.device, wrapper.vae.dtype)
    lines, gaps = [], {}
    with torch.no_grad():
        latents = wrapper.encode(video)
        lines.append(
            f"{family.class_name} from {args.pretrained}: clip {tuple(video.shape)} -> latents "
            f"{tuple(latents.shape)}"
        )
        gaps["encode, wrapper vs pipeline formula"] = _gap(
            latents, pipeline_normalised(args.family, wrapper.vae, video)
        )
        decoded = wrapper.decode(latents)
        gaps["decode, wrapper vs pipeline formula"] = _gap(
            decoded, pipeline_decoded(args.family, wrapper.vae, latents)
        )
        method, gap = pipeline_method_gap(args.family, wrapper, video)
        gaps[f"wrapper vs {method}"] = gap
    lines += [f"{name}: max |diff| {gap:.3g}" for name, gap in gaps.items()]
    lines.append(f"reconstruction PSNR: {psnr(video.float(), decoded.float()):.2f} dB")
    flat = latents.float().transpose(0, 1).flatten(1)
    channel_mean, channel_std = flat.mean(dim=1), flat.std(dim=1)
    lines.append(
        f"normalised latents: mean {flat.mean().item():.3f}, std {flat.std().item():.3f}; per "
        f"channel mean {channel_mean.min().item():.2f}..{channel_mean.max().item():.2f}, std "
        f"{channel_std.min().item():.2f}..{channel_std.max().item():.2f}"
    )
    for line in lines:
        print(line)
    too_large = [name for name, gap in gaps.items() if gap > args.tolerance]
    if too_large:
        print(f"FAILED: {too_large} differ by more than {args.tolerance}")
        raise SystemExit(1)
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--pretrained", required=True, help="local diffusers directory")
    parser.add_argument("--video", default="", help="a video file; default: a synthetic clip")
    parser.add_argument("--frames", type=int, default=17, help="1 + 4k (1 + 8k for cogvideox)")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--chunk-frames", type=int, default=0, help="model.vae.chunk_frames")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    return parser.parse_args(argv)


if __name__ == "__main__":
    check(parse_args(sys.argv[1:]))
