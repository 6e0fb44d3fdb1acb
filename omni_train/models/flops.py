"""Training FLOPs of the denoiser per sample: the figure MFU divides by peak FLOP/s.

Counted as model FLOPs (the PaLM/MFU convention): every matrix multiply, convolution and
attention score/value product of one forward pass, and of the backward pass that training
runs; a multiply-add is 2 FLOPs. Backward is 2x forward for a layer whose input needs a
gradient (input grad + weight grad) and 1x for a layer fed directly by data (weight grad only;
a layer behind a learned norm of data, like the text projection, needs the input grad).
Not counted: elementwise work (norms, RoPE, activations), the frozen VAE and encoders
(forward only, outside the denoiser), and the extra forward that activation checkpointing
recomputes (it costs time but is not model work). Attention is counted dense: padded text
keys cost the same as real ones, as on the kernels that run them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from omni_train.contracts import SPATIAL_STRIDE, TEMPORAL_STRIDE, is_causal_frame_count
from omni_train.models.config import ModelConfig

TIMESTEP_FREQUENCY_DIM = 256
CONV_KERNEL_VOLUME = 27  # the pose guider's 3x3x3 convolutions


@dataclass(frozen=True)
class Flops:
    forward: int = 0
    backward: int = 0

    @property
    def train(self) -> int:
        return self.forward + self.backward

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.forward + other.forward, self.backward + other.backward)

    def __mul__(self, times: int) -> Flops:
        return Flops(self.forward * times, self.backward * times)


@dataclass(frozen=True)
class TokenCounts:
    """Sequence lengths of one sample (pixel clip of ``num_frames`` at ``height`` x ``width``)."""

    latent_frames: int
    tokens_per_frame: int
    frame_tokens: int
    reference_tokens: int
    text_tokens: int
    audio_tokens_per_frame: int

    @property
    def video_tokens(self) -> int:
        return self.frame_tokens + self.reference_tokens


def token_counts(
    cfg: ModelConfig,
    resolution: Sequence[int],
    num_frames: int,
    text_tokens: int | None = None,
) -> TokenCounts:
    """Token counts for a clip; ``text_tokens`` defaults to the text encoder's max_length."""
    height, width = (int(v) for v in resolution)
    if not is_causal_frame_count(num_frames):
        raise ValueError(f"num_frames={num_frames}: the causal VAE needs 1 + 4k frames (e.g. 33)")
    stride = SPATIAL_STRIDE * cfg.dit.patch_size
    if height % stride or width % stride:
        raise ValueError(
            f"resolution {height}x{width} must be a multiple of {stride} in both axes "
            f"(VAE stride {SPATIAL_STRIDE} x dit.patch_size {cfg.dit.patch_size})"
        )
    latent_frames = 1 + (num_frames - 1) // TEMPORAL_STRIDE
    per_frame = (height // stride) * (width // stride)
    text = cfg.text_encoder.max_length if text_tokens is None else int(text_tokens)
    if text < 1:
        raise ValueError(f"text_tokens={text} must be >= 1 (the null text is one token)")
    return TokenCounts(
        latent_frames=latent_frames,
        tokens_per_frame=per_frame,
        frame_tokens=latent_frames * per_frame,
        reference_tokens=per_frame,
        text_tokens=text,
        audio_tokens_per_frame=TEMPORAL_STRIDE + 2 * cfg.dit.audio_window,
    )


def linear(tokens: int, fan_in: int, fan_out: int, input_grad: bool = True) -> Flops:
    """A dense layer over ``tokens`` rows; ``input_grad`` False for layers fed by data."""
    once = 2 * tokens * fan_in * fan_out
    return Flops(once, once * (2 if input_grad else 1))


def attention_scores(queries: int, keys: int, width: int) -> Flops:
    """q k^T and p v summed over heads (``width`` = heads x head_dim); backward is 2x."""
    once = 4 * queries * keys * width
    return Flops(once, 2 * once)


def _conv(out_positions: int, in_channels: int, out_channels: int, kernel: int, input_grad: bool):
    return linear(out_positions, in_channels * kernel, out_channels, input_grad)


def pose_guider_flops(cfg: ModelConfig, height: int, width: int, num_frames: int) -> Flops:
    pose = cfg.pose_guider
    hidden = pose.hidden_channels
    latent_frames = 1 + (num_frames - 1) // TEMPORAL_STRIDE
    half_frames = 1 + (num_frames - 1) // 2
    area = height * width
    return (
        _conv(num_frames * area // 4, pose.num_keypoints, hidden, CONV_KERNEL_VOLUME, False)
        + _conv(half_frames * area // 16, hidden, hidden, CONV_KERNEL_VOLUME, True)
        + _conv(latent_frames * area // 64, hidden, hidden, CONV_KERNEL_VOLUME, True)
        + _conv(latent_frames * area // 64, hidden, pose.out_channels, 1, True)
    )


def flop_breakdown(
    cfg: ModelConfig,
    resolution: Sequence[int],
    num_frames: int,
    text_tokens: int | None = None,
) -> dict[str, Flops]:
    """Per-sample FLOPs of one training step of the denoiser, by component."""
    n = token_counts(cfg, resolution, num_frames, text_tokens)
    dit = cfg.dit
    d = dit.hidden_size
    mlp = int(d * dit.mlp_ratio)
    patch_values = cfg.vae.latent_channels * dit.patch_size**2
    pose_channels = cfg.pose_guider.out_channels * (2 * cfg.pose_guider.neighbor_frames + 1)
    pose_values = pose_channels * dit.patch_size**2
    text_in, lt, nv = cfg.text_encoder.d_model, n.text_tokens, n.video_tokens
    audio_rows = n.latent_frames * n.audio_tokens_per_frame

    text_stream, video_stream, joint, audio = Flops(), Flops(), Flops(), Flops()
    for index in range(dit.depth):
        text_emits = index < dit.depth - 1
        text_stream += linear(1, d, (6 if text_emits else 2) * d)
        text_stream += linear(lt, d, (3 if text_emits else 2) * d)
        if text_emits:
            text_stream += linear(lt, d, d) + linear(lt, d, mlp) + linear(lt, mlp, d)
        video_stream += linear(1, d, 6 * d) + linear(nv, d, 3 * d) + linear(nv, d, d)
        video_stream += linear(nv, d, mlp) + linear(nv, mlp, d)
        joint += attention_scores((lt if text_emits else 0) + nv, lt + nv, d)
        audio += linear(n.frame_tokens, d, d) + linear(audio_rows, d, 2 * d)
        audio += linear(n.frame_tokens, d, d)
        # Each latent frame's tokens attend that frame's audio tokens only.
        audio += attention_scores(n.frame_tokens, n.audio_tokens_per_frame, d)
    audio += linear(audio_rows, cfg.audio_encoder.feature_dim, d, input_grad=False)
    audio += linear(audio_rows, d, d)
    height, width = (int(v) for v in resolution)
    embeddings = (
        linear(nv, patch_values, d, input_grad=False)
        # The text projection's input is the output of a learned RMSNorm, whose weight
        # needs the input gradient: backward is 2x although the text itself is data.
        + linear(lt, text_in, d)
        + linear(1, TIMESTEP_FREQUENCY_DIM, d, input_grad=False)
        + linear(1, d, d)
    )
    final = linear(1, d, 2 * d) + linear(n.frame_tokens, d, patch_values)
    pose = pose_guider_flops(cfg, height, width, num_frames)
    pose += linear(n.frame_tokens, pose_values, d)
    return {
        "text_stream": text_stream,
        "video_stream": video_stream,
        "joint_attention": joint,
        "audio": audio,
        "pose": pose,
        "embeddings": embeddings,
        "final_layer": final,
    }


def forward_flops_per_sample(
    model_cfg: ModelConfig,
    resolution: Sequence[int],
    num_frames: int,
    text_tokens: int | None = None,
) -> int:
    parts = flop_breakdown(model_cfg, resolution, num_frames, text_tokens).values()
    return sum(part.forward for part in parts)


def train_flops_per_sample(
    model_cfg: ModelConfig,
    resolution: Sequence[int],
    num_frames: int,
    text_tokens: int | None = None,
) -> int:
    """Forward + backward FLOPs of the denoiser for one sample of ``num_frames`` pixel frames
    at ``resolution`` (height, width) pixels with ``text_tokens`` (padded) caption tokens.

    MFU = train_flops_per_sample * samples_per_second / (ranks * peak FLOP/s per rank).
    """
    parts = flop_breakdown(model_cfg, resolution, num_frames, text_tokens).values()
    return sum(part.train for part in parts)
