"""Wan 2.1/2.2 (diffusers' WanTransformer3DModel) with the omni conditions added around it.

The base runs as released: patch embedding, 3D RoPE, per block self-attention, text
cross-attention and MLP under its adaLN table, then its output layer. Around it:
- reference: the reference latent's patches join the self-attention sequence after the
  frame tokens, with the RoPE rows of latent frame 0 (temporal index 0); a sample whose
  reference is off has those keys masked, so it attends exactly as the base does;
- audio: per block, after the text cross-attention, frame j's tokens cross-attend to frame j's
  audio tokens (FrameAudioCrossAttention, output zero-initialised);
- pose: the pose guider's features through a zero-initialised copy of the patch embedding's
  shape, added to the frame tokens;
- motion frames: a zero-initialised embedding added to their tokens;
- learned nulls for text (an empty prompt's layout: one token, then zero padding) and audio.
So at initialisation the wrapped model computes what the base computes (tested against the
bare diffusers model). Under sequence parallelism (``sequence_parallel``) each rank keeps its
latent frames and the self-attention runs through ``ulysses_attention`` (the processor's
steps, written out in ``_sharded_self_attention``); the text cross-attention, audio and MLP are
token-local. Timesteps follow the diffusers Wan pipeline: the transformer gets
t * 1000 (FlowMatchEulerDiscreteScheduler's timesteps) and predicts noise - x0.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from omni_train.models.attention import attention
from omni_train.models.conditioning import (
    AudioProjector,
    PoseGuider,
    audio_tokens,
    condition_flags,
    pose_features,
)
from omni_train.models.config import ModelConfig
from omni_train.models.foundation_backbone import load_diffusers_transformer, modules_outside_base
from omni_train.models.mmdit import FrameAudioCrossAttention
from omni_train.models.sequence_parallel import (
    FrameShard,
    SequenceParallel,
    frame_shard,
    ulysses_attention,
)

WAN_CLASS = "WanTransformer3DModel"


class WanOmniDenoiser(nn.Module):
    heads_setting = "the Wan backbone's num_attention_heads"

    @property
    def num_heads(self) -> int:
        return int(self.base.config.num_attention_heads)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.base = load_diffusers_transformer(WAN_CLASS, cfg.backbone)
        config = self.base.config
        check_base_matches(config, cfg)
        self.patch_size = tuple(config.patch_size)
        if self.patch_size[0] != 1:
            raise ValueError(
                f"Wan backbone patch_size={self.patch_size}: only a temporal patch of 1 keeps one "
                "token frame per latent frame (audio and motion frames are per latent frame)"
            )
        self.text_length = cfg.text_encoder.max_length
        self.gradient_checkpointing = cfg.dit.gradient_checkpointing
        self.attention_backend = cfg.dit.attention
        hidden = config.num_attention_heads * config.attention_head_dim
        heads = config.num_attention_heads

        self.pose_guider = PoseGuider(cfg.pose_guider)
        self.pose_patch_embed = nn.Conv3d(
            self.pose_guider.out_channels, hidden, self.patch_size, stride=self.patch_size
        )
        nn.init.zeros_(self.pose_patch_embed.weight)
        nn.init.zeros_(self.pose_patch_embed.bias)
        self.motion_embedding = nn.Parameter(torch.zeros(hidden))
        self.audio_projector = AudioProjector(
            cfg.audio_encoder.feature_dim, hidden, cfg.dit.audio_window
        )
        self.null_audio = nn.Parameter(
            torch.randn(self.audio_projector.tokens_per_frame, hidden) * 0.02
        )
        self.audio_attn = nn.ModuleList(
            FrameAudioCrossAttention(hidden, heads, cfg.dit.attention)
            for _ in range(config.num_layers)
        )
        self.null_text = nn.Parameter(torch.randn(config.text_dim) * 0.02)

        # Everything outside the base is new to it (a trainer may give it its own lr).
        self.new_module_prefixes = modules_outside_base(self)
        self.lora_target_modules = (
            r"base\.blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
            r"|base\.blocks\.\d+\.ffn\.net\.(0\.proj|2)"
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
        """Velocity (B, C, L, h, w) for noisy latents at ``timesteps`` (1 = pure noise); with
        ``sequence_parallel`` of size > 1, of this rank's frames (as OmniDenoiser)."""
        base = self.base
        batch, _, frames, height, width = noisy.shape
        _, patch_h, patch_w = self.patch_size
        if height % patch_h or width % patch_w:
            raise ValueError(f"latent size {height}x{width} must divide by {self.patch_size[1:]}")
        if not 0 <= num_motion_latents < frames:
            raise ValueError(f"num_motion_latents={num_motion_latents} not in [0, {frames})")
        flags = condition_flags(active, batch, noisy.device)
        dtype = base.patch_embedding.weight.dtype
        grid_h, grid_w = height // patch_h, width // patch_w
        per_frame = grid_h * grid_w

        shard = frame_shard(
            sequence_parallel, frames, per_frame, self.num_heads, self.heads_setting
        )
        # Frame-local embeddings (patches, pose guider, motion flag, audio) of this rank's
        # frames only; the reference, text and timestep are computed by every rank.
        own = None if shard is None else (shard.start, shard.stop)
        start, stop = own or (0, frames)

        rope_cos, rope_sin = base.rope(noisy)
        # The reference's rows: latent frame 0's (temporal index 0, same h and w).
        rope = (
            torch.cat([rope_cos, rope_cos[:, :per_frame]], dim=1),
            torch.cat([rope_sin, rope_sin[:, :per_frame]], dim=1),
        )
        frame_tokens = _tokens(base.patch_embedding(noisy[:, :, start:stop].to(dtype)))
        pose = pose_features(
            self.pose_guider, pose_heatmaps, flags["pose"], noisy.shape, dtype, own
        )
        frame_tokens = frame_tokens + _tokens(self.pose_patch_embed(pose))
        is_motion = torch.arange(start, stop, device=noisy.device) < num_motion_latents
        is_motion = is_motion.repeat_interleave(per_frame).to(dtype)
        frame_tokens = frame_tokens + is_motion[:, None] * self.motion_embedding
        ref_tokens = _tokens(base.patch_embedding(ref_latents.to(dtype)))
        hidden = torch.cat([frame_tokens, ref_tokens], dim=1).contiguous()
        num_frame_tokens = frames * per_frame
        self_mask = _reference_key_mask(flags["ref"], num_frame_tokens, ref_tokens.shape[1])

        temb, timestep_proj, context, _ = base.condition_embedder(
            timesteps.to(noisy.device) * 1000.0, self._text(text, text_mask, flags["text"], dtype)
        )
        timestep_proj = timestep_proj.unflatten(1, (6, -1))
        audio = audio_tokens(
            self.audio_projector,
            self.null_audio,
            audio_features,
            flags["audio"],
            frames,
            dtype,
            own,
        )

        if shard is not None:
            rope = tuple(shard.local_rows(table, 1, num_frame_tokens) for table in rope)
            frames, num_frame_tokens = stop - start, shard.num_tokens

        for block, audio_attn in zip(base.blocks, self.audio_attn, strict=True):
            args = (hidden, context, timestep_proj, rope, self_mask, audio, num_frame_tokens)
            if shard is not None:
                args = (*args, shard, self.attention_backend)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                hidden = checkpoint(_block, block, audio_attn, *args, use_reentrant=False)
            else:
                hidden = _block(block, audio_attn, *args)

        shift, scale = (base.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        frames_out = hidden[:, :num_frame_tokens]
        frames_out = (base.norm_out(frames_out.float()) * (1 + scale) + shift).type_as(hidden)
        patches = base.proj_out(frames_out)
        patches = patches.reshape(batch, frames, grid_h, grid_w, 1, patch_h, patch_w, -1)
        return patches.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def _text(
        self, text: torch.Tensor, text_mask: torch.Tensor, text_on: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """Caption embeddings zero-padded to the text length the base was trained with (Wan's
        pipeline pads umT5's output with zeros to max_sequence_length); text off = one learned
        null token, then zeros (an empty caption's layout)."""
        if text.shape[1] > self.text_length:
            raise ValueError(
                f"text has {text.shape[1]} tokens, more than model.text_encoder.max_length="
                f"{self.text_length}"
            )
        text = (text.to(dtype) * text_mask[..., None].to(dtype))[:, : self.text_length]
        padded = text.new_zeros(text.shape[0], self.text_length, text.shape[2])
        padded[:, : text.shape[1]] = text
        null = torch.zeros_like(padded[0])
        null[0] = self.null_text
        return torch.where(text_on[:, None, None], padded, null)


def check_base_matches(config, cfg: ModelConfig) -> None:
    """The base's input and text widths must be what the VAE and text encoder deliver."""
    if config.in_channels != cfg.vae.latent_channels:
        raise ValueError(
            f"the Wan backbone takes {config.in_channels}-channel latents but the VAE gives "
            f"{cfg.vae.latent_channels}; use its family's VAE (model.vae=wan) or set "
            f"model.vae.latent_channels={config.in_channels}"
        )
    if config.text_dim != cfg.text_encoder.d_model:
        raise ValueError(
            f"the Wan backbone takes {config.text_dim}-wide text embeddings but "
            f"model.text_encoder.d_model={cfg.text_encoder.d_model}; set it to {config.text_dim} "
            "(umT5-XXL's width for released Wan)"
        )


def _tokens(patches: torch.Tensor) -> torch.Tensor:
    """(B, hidden, L, h, w) conv output -> (B, L h w, hidden), frame-major as the base flattens."""
    return patches.flatten(2).transpose(1, 2)


def _reference_key_mask(
    ref_on: torch.Tensor, num_frame_tokens: int, num_ref_tokens: int
) -> torch.Tensor | None:
    """(B, 1, 1, N) keys a query may attend to: reference keys only where the reference is on.
    None when every sample has it (no mask, the fastest attention path)."""
    if bool(ref_on.all()):
        return None
    frame_keys = ref_on.new_ones(ref_on.shape[0], num_frame_tokens)
    ref_keys = ref_on[:, None].expand(-1, num_ref_tokens)
    return torch.cat([frame_keys, ref_keys], dim=1)[:, None, None, :]


def _block(
    block: nn.Module,
    audio_attn: FrameAudioCrossAttention,
    hidden: torch.Tensor,
    context: torch.Tensor,
    timestep_proj: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    self_mask: torch.Tensor | None,
    audio: torch.Tensor,
    num_frame_tokens: int,
    frame_shard: FrameShard | None = None,
    attention_backend: str = "auto",
) -> torch.Tensor:
    """diffusers' WanTransformerBlock.forward (its (B, 6, D) timestep path), with the key mask
    in self-attention and the frame-local audio cross-attention after the text one."""
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
        block.scale_shift_table + timestep_proj.float()
    ).chunk(6, dim=1)
    normed = (block.norm1(hidden.float()) * (1 + scale_msa) + shift_msa).type_as(hidden)
    if frame_shard is None:
        attended = block.attn1(normed, None, self_mask, rope)
    else:
        attended = _sharded_self_attention(
            block.attn1, normed, self_mask, rope, frame_shard, attention_backend
        )
    hidden = (hidden.float() + attended * gate_msa).type_as(hidden)

    normed = block.norm2(hidden.float()).type_as(hidden)
    hidden = hidden + block.attn2(normed, context, None, None)
    frames, ref = hidden[:, :num_frame_tokens], hidden[:, num_frame_tokens:]
    hidden = torch.cat([frames + audio_attn(frames, audio), ref], dim=1)

    normed = (block.norm3(hidden.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(hidden)
    mlp_out = block.ffn(normed)
    return (hidden.float() + mlp_out.float() * c_gate_msa).type_as(hidden)


def _sharded_self_attention(
    attn: nn.Module,
    hidden: torch.Tensor,
    key_mask: torch.Tensor | None,
    rope: tuple[torch.Tensor, torch.Tensor],
    shard: FrameShard,
    backend: str,
) -> torch.Tensor:
    """diffusers' WanAttnProcessor (self-attention, no image context) with the attention over
    the whole sequence gathered from this rank's frames (``ulysses_attention``)."""
    if attn.fused_projections:
        query, key, value = attn.to_qkv(hidden).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)
    query, key = attn.norm_q(query), attn.norm_k(key)
    query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
    query, key = _wan_rotary(query, *rope), _wan_rotary(key, *rope)
    out = ulysses_attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        shard,
        lambda q, k, v: attention(q, k, v, key_mask, backend=backend),
    )
    out = out.transpose(1, 2).flatten(2, 3).type_as(query)
    return attn.to_out[1](attn.to_out[0](out))


def _wan_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """WanAttnProcessor's rotary embedding of (B, N, heads, d) by its (1, N, 1, d) tables."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)
