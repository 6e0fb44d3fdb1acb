"""HunyuanVideo (diffusers' HunyuanVideoTransformer3DModel) with the omni conditions around it.

The base runs as released: patch embedding, 3D RoPE, timestep + guidance + pooled-text
conditioning vector, the token refiner over the caption, dual-stream then single-stream blocks
over the joint sequence [latent tokens; text tokens], then its output layer. Around it:
- reference: the reference latent's patches (the base's patch embedding, no new weights) join
  the latent part of the sequence after the frame tokens, with the RoPE rows of latent frame 0
  (temporal index 0); a sample whose reference is off has those keys masked, so its frame
  tokens attend exactly as in the base;
- text: a caption's token embeddings and mask go to the base's token refiner; text off = one
  learned null token (``null_text``, in the text encoder's space) as the only valid token;
- pooled text: HunyuanVideo's pipeline feeds CLIP-L's pooled caption vector to the conditioning
  vector; this project has one text encoder, so a learned vector ``pooled_text`` (zeros at
  init, the same for every sample) stands in for it;
- guidance: the released transformer is guidance-distilled and takes the guidance scale as an
  input, ``model.backbone.embedded_guidance`` x 1000 as the pipeline gives it;
- audio: after every block (dual- and single-stream), frame j's tokens cross-attend to frame
  j's audio tokens (FrameAudioCrossAttention, output zero-initialised);
- pose: the pose guider's features through a zero-initialised conv shaped like the patch
  embedding, added to the frame tokens; pose off = zero features;
- motion frames: a zero-initialised embedding added to their tokens.
So at initialisation the wrapped model computes what the base computes (tested against the
bare diffusers model). Under sequence parallelism (``sequence_parallel``) each rank keeps its
latent frames; while a block runs, its attention processor is swapped for
``_UlyssesAttnProcessor`` (the base processor's steps with ``ulysses_attention``), inside the
checkpointed function so a recompute swaps it again. Timesteps follow the diffusers pipeline: the transformer gets t * 1000
(FlowMatchEulerDiscreteScheduler's timesteps, 1 = noise) and predicts noise - x0.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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

HUNYUAN_CLASS = "HunyuanVideoTransformer3DModel"

# The base's attention projections and MLP linears, by module name (peft full-matches it).
LORA_TARGET_MODULES = (
    r"base\.transformer_blocks\.\d+\.attn\."
    r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|base\.transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)"
    r"|base\.single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)"
)


class HunyuanOmniDenoiser(nn.Module):
    heads_setting = "the HunyuanVideo backbone's num_attention_heads"

    @property
    def num_heads(self) -> int:
        return int(self.base.config.num_attention_heads)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.base = load_diffusers_transformer(HUNYUAN_CLASS, cfg.backbone)
        config = self.base.config
        check_base_matches(config, cfg)
        self.patch_size = config.patch_size
        self.gradient_checkpointing = cfg.dit.gradient_checkpointing
        self.attention_backend = cfg.dit.attention
        self.guidance_embeds = bool(config.guidance_embeds)
        self.embedded_guidance = cfg.backbone.embedded_guidance
        hidden = config.num_attention_heads * config.attention_head_dim
        num_blocks = config.num_layers + config.num_single_layers

        self.null_text = nn.Parameter(torch.randn(config.text_embed_dim) * 0.02)
        self.pooled_text = nn.Parameter(torch.zeros(config.pooled_projection_dim))
        self.pose_guider = PoseGuider(cfg.pose_guider)
        patch = (config.patch_size_t, config.patch_size, config.patch_size)
        self.pose_patch_embed = nn.Conv3d(
            self.pose_guider.out_channels, hidden, kernel_size=patch, stride=patch
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
        # One per block: the dual-stream blocks' first, then the single-stream blocks'.
        self.audio_attn = nn.ModuleList(
            FrameAudioCrossAttention(hidden, config.num_attention_heads, cfg.dit.attention)
            for _ in range(num_blocks)
        )

        # Everything outside the base is new to it (a trainer may give it its own lr).
        self.new_module_prefixes = modules_outside_base(self)
        self.lora_target_modules = LORA_TARGET_MODULES

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
        batch, channels, frames, height, width = noisy.shape
        patch = self.patch_size
        if height % patch or width % patch:
            raise ValueError(f"latent size {height}x{width} must divide by patch_size={patch}")
        if not 0 <= num_motion_latents < frames:
            raise ValueError(f"num_motion_latents={num_motion_latents} not in [0, {frames})")
        if ref_latents.shape != (batch, channels, 1, height, width):
            raise ValueError(
                f"ref_latents {tuple(ref_latents.shape)} must be one latent frame shaped like "
                f"the noisy latents' frames: {(batch, channels, 1, height, width)}"
            )
        flags = condition_flags(active, batch, noisy.device)
        dtype = base.x_embedder.proj.weight.dtype
        grid_h, grid_w = height // patch, width // patch
        per_frame = grid_h * grid_w
        num_frame_tokens = frames * per_frame

        shard = frame_shard(
            sequence_parallel, frames, per_frame, self.num_heads, self.heads_setting
        )
        # Frame-local embeddings (patches, pose guider, motion flag, audio) of this rank's
        # frames only; the reference, text, timestep and guidance are computed by every rank.
        own = None if shard is None else (shard.start, shard.stop)
        start, stop = own or (0, frames)

        rope_cos, rope_sin = base.rope(noisy)
        # The reference's rows: latent frame 0's (temporal index 0, same h and w).
        rope = (
            torch.cat([rope_cos, rope_cos[:per_frame]]),
            torch.cat([rope_sin, rope_sin[:per_frame]]),
        )

        timestep = timesteps.to(noisy.device, torch.float32) * 1000.0
        guidance = None
        if self.guidance_embeds:
            # pipeline_hunyuan_video.py, HunyuanVideoPipeline.__call__, "6. Prepare guidance
            # condition": torch.tensor([guidance_scale] * B, dtype=transformer_dtype) * 1000.0
            guidance = torch.full(
                (batch,), self.embedded_guidance, dtype=dtype, device=noisy.device
            )
            guidance = guidance * 1000.0
        pooled = self.pooled_text.to(dtype).expand(batch, -1)
        temb, _ = base.time_text_embed(timestep, pooled, guidance)
        text_tokens, text_keys = self._text(text, text_mask, flags["text"], dtype)
        context = base.context_embedder(text_tokens, timestep, text_keys)

        frame_tokens = base.x_embedder(noisy[:, :, start:stop].to(dtype))
        pose = pose_features(
            self.pose_guider, pose_heatmaps, flags["pose"], noisy.shape, dtype, own
        )
        frame_tokens = frame_tokens + self.pose_patch_embed(pose).flatten(2).transpose(1, 2)
        # Applied even with no motion frames, so the parameter always gets a (zero) gradient.
        is_motion = torch.arange(start, stop, device=noisy.device) < num_motion_latents
        is_motion = is_motion.repeat_interleave(per_frame).to(dtype)
        frame_tokens = frame_tokens + is_motion[:, None] * self.motion_embedding
        ref_tokens = base.x_embedder(ref_latents.to(dtype))
        hidden = torch.cat([frame_tokens, ref_tokens], dim=1)

        # Keys of the joint sequence [frames; reference; text], as the base's (B, 1, 1, N) mask.
        frame_keys = text_keys.new_ones(batch, num_frame_tokens)
        ref_keys = flags["ref"][:, None].expand(-1, per_frame)
        key_mask = torch.cat([frame_keys, ref_keys, text_keys], dim=1)[:, None, None, :]
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
            rope = tuple(shard.local_rows(table, 0, num_frame_tokens) for table in rope)
            frames, num_frame_tokens = stop - start, shard.num_tokens

        blocks = [*base.transformer_blocks, *base.single_transformer_blocks]
        for block, audio_attn in zip(blocks, self.audio_attn, strict=True):
            args = (hidden, context, temb, key_mask, rope, audio, num_frame_tokens)
            if shard is not None:
                args = (*args, shard, self.attention_backend)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                hidden, context = checkpoint(_block, block, audio_attn, *args, use_reentrant=False)
            else:
                hidden, context = _block(block, audio_attn, *args)

        patches = base.proj_out(base.norm_out(hidden[:, :num_frame_tokens], temb))
        # The base's unpatchify (temporal patch 1).
        patches = patches.reshape(batch, frames, grid_h, grid_w, -1, 1, patch, patch)
        patches = patches.permute(0, 4, 1, 5, 2, 6, 3, 7)
        return patches.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def _text(
        self, text: torch.Tensor, text_mask: torch.Tensor, text_on: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption embeddings and their bool mask; text off = the null token, alone valid."""
        if text.shape[1] < 1:
            raise ValueError("text must have at least one token position (pad if empty)")
        tokens = torch.where(text_on[:, None, None], text.to(dtype), self.null_text.to(dtype))
        only_first = torch.zeros_like(text_mask, dtype=torch.bool)
        only_first[:, 0] = True
        keys = torch.where(text_on[:, None], text_mask.bool(), only_first)
        return tokens, keys


def check_base_matches(config, cfg: ModelConfig) -> None:
    """The base must take what the VAE and text encoder deliver, one token frame per latent
    frame, and give a velocity shaped like its input."""
    if config.image_condition_type is not None:
        raise ValueError(
            f"the HunyuanVideo backbone has image_condition_type={config.image_condition_type!r}"
            " (an image-to-video variant); this denoiser takes the reference as tokens, so use "
            "the text-to-video transformer (image_condition_type None)"
        )
    if config.in_channels != cfg.vae.latent_channels:
        raise ValueError(
            f"the HunyuanVideo backbone takes {config.in_channels}-channel latents but the VAE "
            f"gives {cfg.vae.latent_channels}; use its family's VAE (model.vae=hunyuan_video) "
            f"or set model.vae.latent_channels={config.in_channels}"
        )
    if (config.out_channels or config.in_channels) != config.in_channels:
        raise ValueError(
            f"the HunyuanVideo backbone predicts {config.out_channels} channels from "
            f"{config.in_channels}; the velocity must have the latents' channels (set "
            f"model.backbone.diffusers_config.out_channels={config.in_channels})"
        )
    if config.text_embed_dim != cfg.text_encoder.d_model:
        raise ValueError(
            f"the HunyuanVideo backbone takes {config.text_embed_dim}-wide text embeddings but "
            f"model.text_encoder.d_model={cfg.text_encoder.d_model}; set it to "
            f"{config.text_embed_dim} (4096, LLaVA-Llama-3-8B's width, for released HunyuanVideo)"
        )
    if config.patch_size_t != 1:
        raise ValueError(
            f"the HunyuanVideo backbone has patch_size_t={config.patch_size_t}: only a temporal "
            "patch of 1 keeps one token frame per latent frame (audio and motion frames are per "
            "latent frame)"
        )
    if config.patch_size != cfg.dit.patch_size:
        raise ValueError(
            f"the HunyuanVideo backbone has patch_size={config.patch_size} but "
            f"model.dit.patch_size={cfg.dit.patch_size} (the resolution checks read it); set "
            f"model.dit.patch_size={config.patch_size}"
        )


def _block(
    block: nn.Module,
    audio_attn: FrameAudioCrossAttention,
    hidden: torch.Tensor,
    context: torch.Tensor,
    temb: torch.Tensor,
    key_mask: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    audio: torch.Tensor,
    num_frame_tokens: int,
    frame_shard: FrameShard | None = None,
    attention_backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One base block as it is, then frame j's tokens (not the reference's) attend to frame j's
    audio. With ``frame_shard`` the block's attention runs sequence-parallel."""
    if frame_shard is None:
        hidden, context = block(hidden, context, temb, key_mask, rope)
    else:
        with _ulysses_processor(block.attn, frame_shard, attention_backend):
            hidden, context = block(hidden, context, temb, key_mask, rope)
    frames, ref = hidden[:, :num_frame_tokens], hidden[:, num_frame_tokens:]
    return torch.cat([frames + audio_attn(frames, audio), ref], dim=1), context


@contextmanager
def _ulysses_processor(attn: nn.Module, shard: FrameShard, backend: str) -> Iterator[None]:
    original = attn.processor
    attn.processor = _UlyssesAttnProcessor(shard, backend)
    try:
        yield
    finally:
        attn.processor = original


class _UlyssesAttnProcessor:
    """diffusers' HunyuanVideoAttnProcessor2_0 over [this rank's latent tokens (its frames, then
    the reference); text], attending to the whole sequence through ``ulysses_attention``."""

    def __init__(self, shard: FrameShard, backend: str) -> None:
        self.shard = shard
        self.backend = backend

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        num_latent = hidden_states.shape[1]
        dual_stream = attn.add_q_proj is not None
        if not dual_stream:  # a single-stream block projects text with the same weights
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = (
            proj(hidden_states).unflatten(2, (attn.heads, -1))
            for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        query, key = _norm(attn.norm_q, query), _norm(attn.norm_k, key)
        query, key = (
            torch.cat(
                [
                    apply_rotary_emb(x[:, :num_latent], image_rotary_emb, sequence_dim=1),
                    x[:, num_latent:],
                ],
                dim=1,
            )
            for x in (query, key)
        )
        if dual_stream:
            text_q, text_k, text_v = (
                proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            query = torch.cat([query, _norm(attn.norm_added_q, text_q)], dim=1)
            key = torch.cat([key, _norm(attn.norm_added_k, text_k)], dim=1)
            value = torch.cat([value, text_v], dim=1)

        out = ulysses_attention(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            self.shard,
            lambda q, k, v: attention(q, k, v, attention_mask, backend=self.backend),
        )
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        latent, text = out[:, :num_latent], out[:, num_latent:]
        if getattr(attn, "to_out", None) is not None:
            latent = attn.to_out[1](attn.to_out[0](latent))
        if getattr(attn, "to_add_out", None) is not None:
            text = attn.to_add_out(text)
        return latent, text


def _norm(norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)
