"""MMDiT blocks: text and video streams with their own weights meeting in one joint attention.

Per block: adaLN-Zero modulation from the conditioning vector, joint attention over
[text; video] (3D RoPE on the video stream only, text key padding), a frame-local audio
cross-attention for the video frame tokens, then each stream's MLP. The video stream holds the
video frame tokens followed by any extra tokens (the reference), which skip the audio step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from omni_train.models.attention import attention
from omni_train.models.rope import apply_rope
from omni_train.models.sequence_parallel import FrameShard, ulysses_attention


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def _zero_linear(in_features: int, out_features: int) -> nn.Linear:
    linear = nn.Linear(in_features, out_features)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads*d) -> (B, heads, N, d)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(-2)


def _mlp(hidden_size: int, mlp_ratio: float) -> nn.Sequential:
    inner = int(hidden_size * mlp_ratio)
    return nn.Sequential(
        nn.Linear(hidden_size, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden_size)
    )


class Modulation(NamedTuple):
    """A block's adaLN-Zero modulation of one stream, named and ordered as DiT writes it:
    shift/scale/gate around attention (msa), then around the MLP. A stream that only lends
    keys and values (the last block's text stream) has the first two only."""

    shift_msa: torch.Tensor
    scale_msa: torch.Tensor
    gate_msa: torch.Tensor | None = None
    shift_mlp: torch.Tensor | None = None
    scale_mlp: torch.Tensor | None = None
    gate_mlp: torch.Tensor | None = None


class Stream(nn.Module):
    """One modality's weights in a block. Without ``emits_output`` (the text stream of the last
    block) it only lends keys and values to the joint attention."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, emits_output: bool):
        super().__init__()
        self.num_heads = num_heads
        self.emits_output = emits_output
        head_dim = hidden_size // num_heads
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden_size, (3 if emits_output else 2) * hidden_size)
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6)
        # Modulation's fields in order: 6 with output, else shift/scale for the attention input.
        self.modulation = _zero_linear(hidden_size, (6 if emits_output else 2) * hidden_size)
        if emits_output:
            self.q_norm = nn.RMSNorm(head_dim, eps=1e-6)
            self.attn_out = nn.Linear(hidden_size, hidden_size)
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.mlp = _mlp(hidden_size, mlp_ratio)

    def modulate_by(self, cond: torch.Tensor) -> Modulation:
        """``cond``: the silu-activated conditioning vector (B, hidden)."""
        return Modulation(*self.modulation(cond).chunk(6 if self.emits_output else 2, dim=-1))

    def project(
        self, x: torch.Tensor, mod: Modulation
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        modulated = modulate(self.norm1(x), mod.shift_msa, mod.scale_msa)
        heads = _split_heads(self.qkv(modulated), self.num_heads)
        if self.emits_output:
            q, k, v = heads.chunk(3, dim=-1)
            return self.q_norm(q), self.k_norm(k), v
        k, v = heads.chunk(2, dim=-1)
        return None, self.k_norm(k), v

    def after_attention(
        self, x: torch.Tensor, attended: torch.Tensor, mod: Modulation
    ) -> torch.Tensor:
        return x + mod.gate_msa[:, None] * self.attn_out(attended)

    def feed_forward(self, x: torch.Tensor, mod: Modulation) -> torch.Tensor:
        modulated = modulate(self.norm2(x), mod.shift_mlp, mod.scale_mlp)
        return x + mod.gate_mlp[:, None] * self.mlp(modulated)


class FrameAudioCrossAttention(nn.Module):
    """Video tokens of latent frame j attend only to frame j's audio tokens.

    Frames are folded into the batch, so no (frames x frames) mask is ever built. The output
    projection starts at zero, so a fresh module leaves the video stream unchanged.
    """

    def __init__(self, hidden_size: int, num_heads: int, backend: str) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.backend = backend
        head_dim = hidden_size // num_heads
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.out = _zero_linear(hidden_size, hidden_size)

    def forward(self, frame_tokens: torch.Tensor, audio_tokens: torch.Tensor) -> torch.Tensor:
        """(B, L*n, hidden) frame tokens and (B, L, K, hidden) audio -> (B, L*n, hidden) update."""
        batch, frames, slots, hidden = audio_tokens.shape
        per_frame = frame_tokens.reshape(batch * frames, -1, hidden)
        q = self.q_norm(_split_heads(self.q(self.norm(per_frame)), self.num_heads))
        kv = _split_heads(
            self.kv(audio_tokens.reshape(batch * frames, slots, hidden)), self.num_heads
        )
        k, v = kv.chunk(2, dim=-1)
        attended = attention(q, self.k_norm(k), v, backend=self.backend)
        return self.out(_merge_heads(attended)).reshape(frame_tokens.shape)


class MMDiTBlock(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        text_emits_output: bool,
        attention_backend: str,
    ) -> None:
        super().__init__()
        self.attention_backend = attention_backend
        self.text = Stream(hidden_size, num_heads, mlp_ratio, emits_output=text_emits_output)
        self.video = Stream(hidden_size, num_heads, mlp_ratio, emits_output=True)
        self.audio_attn = FrameAudioCrossAttention(hidden_size, num_heads, attention_backend)

    def forward(
        self,
        text: torch.Tensor,
        video: torch.Tensor,
        cond: torch.Tensor,
        key_mask: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        audio_tokens: torch.Tensor,
        num_frame_tokens: int,
        frame_shard: FrameShard | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """text (B, Lt, h), video (B, Nv, h), cond (B, h), key_mask (B, 1, 1, Lt + Nv) bool;
        the first ``num_frame_tokens`` video-stream tokens are frame tokens.

        With ``frame_shard`` (sequence parallelism) the video stream holds this rank's frame
        tokens then the reference's, rope tables and audio tokens are this rank's rows, and
        key_mask covers the whole sequence [text; every rank's frames; reference]."""
        cond = nn.functional.silu(cond)
        text_mod, video_mod = self.text.modulate_by(cond), self.video.modulate_by(cond)
        q_t, k_t, v_t = self.text.project(text, text_mod)
        q_v, k_v, v_v = self.video.project(video, video_mod)
        q_v, k_v = apply_rope(q_v, rope_cos, rope_sin), apply_rope(k_v, rope_cos, rope_sin)
        k = torch.cat([k_t, k_v], dim=2)
        v = torch.cat([v_t, v_v], dim=2)
        q = q_v if q_t is None else torch.cat([q_t, q_v], dim=2)
        if frame_shard is None:
            attended = attention(q, k, v, key_mask, backend=self.attention_backend)
        else:
            attended = ulysses_attention(
                q,
                k,
                v,
                frame_shard,
                lambda q, k, v: attention(q, k, v, key_mask, backend=self.attention_backend),
                q_before=0 if q_t is None else k_t.shape[2],
                kv_before=k_t.shape[2],
            )
        attended = _merge_heads(attended)
        num_text = attended.shape[1] - video.shape[1]

        video = self.video.after_attention(video, attended[:, num_text:], video_mod)
        frames, extra = video[:, :num_frame_tokens], video[:, num_frame_tokens:]
        frames = frames + self.audio_attn(frames, audio_tokens)
        video = self.video.feed_forward(torch.cat([frames, extra], dim=1), video_mod)
        if not self.text.emits_output:
            return None, video
        text = self.text.after_attention(text, attended[:, :num_text], text_mod)
        return self.text.feed_forward(text, text_mod), video


class FinalLayer(nn.Module):
    """adaLN then a zero-initialised linear to patch values (the model starts at v = 0)."""

    def __init__(self, hidden_size: int, out_features: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.modulation = _zero_linear(hidden_size, 2 * hidden_size)
        self.linear = _zero_linear(hidden_size, out_features)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(nn.functional.silu(cond)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class MMDiT(nn.Module):
    """The stack of blocks and the final layer; outputs patch values for frame tokens only."""

    def __init__(
        self,
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        out_features: int,
        attention_backend: str = "auto",
        gradient_checkpointing: bool = False,
        checkpoint_every_n_blocks: int = 1,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"dit.hidden_size={hidden_size} must divide by num_heads={num_heads}")
        if checkpoint_every_n_blocks < 1:
            raise ValueError(
                f"dit.checkpoint_every_n_blocks={checkpoint_every_n_blocks} must be >= 1"
            )
        self.gradient_checkpointing = gradient_checkpointing
        self.checkpoint_every_n_blocks = checkpoint_every_n_blocks
        self.blocks = nn.ModuleList(
            MMDiTBlock(hidden_size, num_heads, mlp_ratio, i < depth - 1, attention_backend)
            for i in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, out_features)

    def checkpointed_blocks(self) -> list[int]:
        """Indices of the blocks recomputed in the backward pass."""
        if not self.gradient_checkpointing:
            return []
        return list(range(0, len(self.blocks), self.checkpoint_every_n_blocks))

    def forward(
        self,
        text: torch.Tensor,
        video: torch.Tensor,
        cond: torch.Tensor,
        key_mask: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        audio_tokens: torch.Tensor,
        num_frame_tokens: int,
        frame_shard: FrameShard | None = None,
    ) -> torch.Tensor:
        checkpointed = set(self.checkpointed_blocks()) if torch.is_grad_enabled() else set()
        for index, block in enumerate(self.blocks):
            args = (text, video, cond, key_mask, rope_cos, rope_sin, audio_tokens, num_frame_tokens)
            args = args if frame_shard is None else (*args, frame_shard)
            if index in checkpointed:
                text, video = checkpoint(block, *args, use_reentrant=False)
            else:
                text, video = block(*args)
        return self.final_layer(video[:, :num_frame_tokens], cond)
