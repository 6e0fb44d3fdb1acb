"""OmniDenoiser: the MMDiT velocity model with text, reference, audio, pose and motion frames.

Token layout of the video stream: the latent frames' patches (frame-major raster order),
then the reference latent's patches. The reference shares the patch embedding and gets RoPE
positions (t=0, h, w); it adds no parameters beyond the null token that replaces it when the
reference is dropped. Pose features are stacked with the noisy latent on channels; their
patch-embedding weights start at zero, so pose changes nothing until trained.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from omni_train.models.attention import BACKENDS
from omni_train.models.conditioning import (
    AudioProjector,
    PoseGuider,
    TimestepEmbedding,
    audio_tokens,
    condition_flags,
    pose_features,
)
from omni_train.models.config import BACKBONE_FAMILIES, ModelConfig
from omni_train.models.mmdit import MMDiT
from omni_train.models.rope import grid_positions, rope_cos_sin, validate_rope_axes
from omni_train.models.sequence_parallel import SequenceParallel, frame_shard
from omni_train.models.weights import load_strict


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, L, h, w) -> (B, L * h/p * w/p, C p p)."""
    return rearrange(x, "b c l (gh ph) (gw pw) -> b (l gh gw) (c ph pw)", ph=patch, pw=patch)


def unpatchify(
    tokens: torch.Tensor, frames: int, grid_h: int, grid_w: int, patch: int
) -> torch.Tensor:
    return rearrange(
        tokens,
        "b (l gh gw) (c ph pw) -> b c l (gh ph) (gw pw)",
        l=frames,
        gh=grid_h,
        gw=grid_w,
        ph=patch,
        pw=patch,
    )


def video_stream_positions(frames: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """(t, h, w) RoPE positions of the video stream: frame tokens (t = latent frame index)
    followed by reference tokens (t = 0)."""
    return torch.cat([grid_positions(frames, grid_h, grid_w), grid_positions(1, grid_h, grid_w)])


class OmniDenoiser(nn.Module):
    # The setting that sets the joint attention's heads (sequence parallelism splits them).
    heads_setting = "model.dit.num_heads"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dit = cfg.dit
        if dit.hidden_size % dit.num_heads:
            raise ValueError(f"dit.hidden_size={dit.hidden_size} must divide by dit.num_heads")
        validate_rope_axes(dit.rope_axes, dit.hidden_size // dit.num_heads)
        if dit.attention not in BACKENDS:
            raise ValueError(f"dit.attention={dit.attention!r} not in {BACKENDS}")
        self.patch_size = dit.patch_size
        self.latent_channels = cfg.vae.latent_channels
        self.rope_axes = list(dit.rope_axes)
        self.rope_theta = dit.rope_theta
        self.num_heads = dit.num_heads
        hidden = dit.hidden_size
        patch_area = dit.patch_size**2

        self.patch_embed = nn.Linear(self.latent_channels * patch_area, hidden)
        self.pose_guider = PoseGuider(cfg.pose_guider)
        self.pose_patch_embed = nn.Linear(
            self.pose_guider.out_channels * patch_area, hidden, bias=False
        )
        nn.init.zeros_(self.pose_patch_embed.weight)
        self.text_proj = nn.Sequential(
            nn.RMSNorm(cfg.text_encoder.d_model, eps=1e-6),
            nn.Linear(cfg.text_encoder.d_model, hidden),
        )
        self.timestep_embed = TimestepEmbedding(hidden)
        self.audio_projector = AudioProjector(
            cfg.audio_encoder.feature_dim, hidden, dit.audio_window
        )
        # Learned stand-ins for a condition that is off (dropped in training, or never given).
        # They are used only inside this module's forward, where parameter-sharding wrappers
        # expect every parameter use to happen (no helper methods on children).
        self.null_text = nn.Parameter(torch.randn(hidden) * 0.02)
        tokens_per_frame = self.audio_projector.tokens_per_frame
        self.null_audio = nn.Parameter(torch.randn(tokens_per_frame, hidden) * 0.02)
        self.null_reference = nn.Parameter(torch.randn(hidden) * 0.02)
        self.motion_embedding = nn.Parameter(torch.randn(hidden) * 0.02)
        self.backbone = MMDiT(
            hidden,
            dit.depth,
            dit.num_heads,
            dit.mlp_ratio,
            out_features=self.latent_channels * patch_area,
            attention_backend=dit.attention,
            gradient_checkpointing=dit.gradient_checkpointing,
            checkpoint_every_n_blocks=dit.checkpoint_every_n_blocks,
        )
        # The base's attention and MLP linears (trainer.finetune.mode=lora adapts them).
        self.lora_target_modules = (
            r"backbone\.blocks\.\d+\.(text|video)\.(qkv|attn_out|mlp\.0|mlp\.2)"
        )
        # Modules that do not exist in a text-to-video MMDiT: a trainer may give them their own lr.
        self.new_module_prefixes: tuple[str, ...] = (
            "audio_projector.",
            "null_audio",
            "null_reference",
            "motion_embedding",
            "pose_guider.",
            "pose_patch_embed.",
            *(f"backbone.blocks.{i}.audio_attn." for i in range(dit.depth)),
        )

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        ref_latents: torch.Tensor,
        audio_features: torch.Tensor | None,
        pose_heatmaps: torch.Tensor | None,
        active: dict[str, torch.Tensor],
        num_motion_latents: int = 0,
        sequence_parallel: SequenceParallel | None = None,
    ) -> torch.Tensor:
        """Velocity (B, C, L, h, w) for noisy latents at ``timesteps`` (1 = pure noise).

        With ``sequence_parallel`` of size > 1 every rank of the group passes the same inputs
        and gets the velocity of its own frames (omni_train/models/sequence_parallel.py).
        """
        batch, _, frames, height, width = noisy.shape
        patch = self.patch_size
        if height % patch or width % patch:
            raise ValueError(f"latent size {height}x{width} must divide by patch_size={patch}")
        if not 0 <= num_motion_latents < frames:
            raise ValueError(f"num_motion_latents={num_motion_latents} not in [0, {frames})")
        flags = condition_flags(active, batch, noisy.device)
        dtype = self.patch_embed.weight.dtype
        grid_h, grid_w = height // patch, width // patch

        shard = frame_shard(
            sequence_parallel, frames, grid_h * grid_w, self.num_heads, self.heads_setting
        )
        # Frame-local embeddings (patches, pose guider, motion flag, audio) of this rank's
        # frames only; the reference, text and timestep are computed by every rank.
        own = None if shard is None else (shard.start, shard.stop)
        start, stop = own or (0, frames)
        pose = pose_features(
            self.pose_guider, pose_heatmaps, flags["pose"], noisy.shape, dtype, own
        )
        frame_tokens = self.patch_embed(patchify(noisy[:, :, start:stop].to(dtype), patch))
        frame_tokens = frame_tokens + self.pose_patch_embed(patchify(pose, patch))
        # Applied even with no motion frames, so the parameter always gets a (zero) gradient.
        is_motion = torch.arange(start, stop, device=noisy.device) < num_motion_latents
        is_motion = is_motion.repeat_interleave(grid_h * grid_w).to(dtype)
        frame_tokens = frame_tokens + is_motion[:, None] * self.motion_embedding
        ref_tokens = self.patch_embed(patchify(ref_latents.to(dtype), patch))
        ref_tokens = torch.where(flags["ref"][:, None, None], ref_tokens, self.null_reference)
        video = torch.cat([frame_tokens, ref_tokens], dim=1)

        text_tokens, text_keys = self._text_tokens(text, text_mask, flags["text"], dtype)
        # Keys of the whole sequence (under SP, attention gathers every rank's frames).
        video_keys = text_keys.new_ones(batch, frames * grid_h * grid_w + ref_tokens.shape[1])
        key_mask = torch.cat([text_keys, video_keys], dim=1)[:, None, None, :]
        audio = audio_tokens(
            self.audio_projector,
            self.null_audio,
            audio_features,
            flags["audio"],
            frames,
            dtype,
            own,
        )
        cond = self.timestep_embed(timesteps.to(noisy.device))
        positions = video_stream_positions(frames, grid_h, grid_w).to(noisy.device)
        rope_cos, rope_sin = rope_cos_sin(positions, self.rope_axes, self.rope_theta, dtype)
        num_frame_tokens = frame_tokens.shape[1]
        if shard is not None:
            every_frame = frames * grid_h * grid_w
            rope_cos = shard.local_rows(rope_cos, 0, every_frame)
            rope_sin = shard.local_rows(rope_sin, 0, every_frame)
            frames = stop - start

        patches = self.backbone(
            text_tokens,
            video,
            cond,
            key_mask,
            rope_cos,
            rope_sin,
            audio,
            num_frame_tokens=num_frame_tokens,
            frame_shard=shard,
        )
        return unpatchify(patches, frames, grid_h, grid_w, patch)

    def _text_tokens(
        self, text: torch.Tensor, text_mask: torch.Tensor, text_on: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Project text; a sample with text off sees one learned null token in its place."""
        if text.shape[1] < 1:
            raise ValueError("text must have at least one token position (pad if empty)")
        tokens = torch.where(text_on[:, None, None], self.text_proj(text.to(dtype)), self.null_text)
        only_first = torch.zeros_like(text_mask, dtype=torch.bool)
        only_first[:, 0] = True
        keys = torch.where(text_on[:, None], text_mask.bool(), only_first)
        return tokens, keys


def build_denoiser(cfg: ModelConfig) -> nn.Module:
    """The velocity model of ``cfg.backbone.family`` with its base weights loaded.

    Every family has the same forward as OmniDenoiser and names its parameters in two sets:
    ``new_module_prefixes`` (the omni-condition modules, absent from a text-to-video base) and
    ``lora_target_modules`` (a regex over module names: the base's attention and MLP linears).
    """
    family = cfg.backbone.family
    if family not in BACKBONE_FAMILIES:
        raise ValueError(
            f"model.backbone.family={family!r} is not one of {BACKBONE_FAMILIES} "
            "('' = this project's MMDiT)"
        )
    if family == "wan":
        from omni_train.models.wan_denoiser import WanOmniDenoiser

        return WanOmniDenoiser(cfg)
    if family == "hunyuan_video":
        from omni_train.models.hunyuan_denoiser import HunyuanOmniDenoiser

        return HunyuanOmniDenoiser(cfg)
    denoiser = OmniDenoiser(cfg)
    if cfg.backbone.pretrained:
        load_strict(denoiser, cfg.backbone.pretrained, "model.backbone.pretrained")
    return denoiser


def attention_heads(cfg: ModelConfig) -> tuple[int, str]:
    """(heads, the setting that sets them) of the denoiser's joint attention, read from the
    config (a family's from its transformer's config, without building it)."""
    family = cfg.backbone.family
    if not family:
        return cfg.dit.num_heads, OmniDenoiser.heads_setting
    from omni_train.models.foundation_backbone import transformer_config_value

    if family == "wan":
        from omni_train.models.wan_denoiser import WAN_CLASS as class_name
        from omni_train.models.wan_denoiser import WanOmniDenoiser as wrapper
    else:
        from omni_train.models.hunyuan_denoiser import HUNYUAN_CLASS as class_name
        from omni_train.models.hunyuan_denoiser import HunyuanOmniDenoiser as wrapper
    heads = transformer_config_value(class_name, cfg.backbone, "num_attention_heads")
    return int(heads), wrapper.heads_setting


def count_parameters(module: nn.Module) -> dict[str, int]:
    """Parameter counts per top-level child (and direct parameter), plus total and trainable."""
    counts = {
        name: sum(p.numel() for p in child.parameters()) for name, child in module.named_children()
    }
    for name, param in module.named_parameters(recurse=False):
        counts[name] = param.numel()
    counts["total"] = sum(p.numel() for p in module.parameters())
    counts["trainable"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return counts
