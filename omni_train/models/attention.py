"""Scaled dot-product attention with a flash-attn fast path and a torch SDPA twin.

All tensors are (batch, heads, tokens, head_dim). A boolean mask broadcastable to
(batch, heads, queries, keys) marks the keys a query may attend (True = allowed).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

BACKENDS: tuple[str, ...] = ("auto", "sdpa", "flash")
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def _flash_functions() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_func, flash_attn_varlen_func


def flash_available() -> bool:
    return _flash_functions() is not None


def is_key_padding_mask(mask: torch.Tensor) -> bool:
    """A (batch, 1, 1, keys) mask: the same allowed keys for every head and query."""
    return mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1


def _on_cuda(q: torch.Tensor) -> bool:
    return q.is_cuda


def _flash_eligible(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    return (
        _on_cuda(q)
        and q.dtype in _FLASH_DTYPES
        and (mask is None or is_key_padding_mask(mask))
        and flash_available()
    )


def select_backend(q: torch.Tensor, mask: torch.Tensor | None = None, backend: str = "auto") -> str:
    """The kernel ``attention`` runs: "flash" (dense flash-attn), "flash_varlen" (flash-attn
    with the masked keys packed out, when samples' key lengths differ) or "sdpa".

    flash-attn needs CUDA fp16/bf16 tensors and at most a key-padding mask; anything else
    (CPU, fp32, a per-query mask such as frame-local attention) runs torch SDPA.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} not in {BACKENDS}")
    if backend == "sdpa":
        return "sdpa"
    if not _flash_eligible(q, mask):
        if backend == "flash":
            raise RuntimeError(
                "attention backend 'flash' needs flash-attn installed, CUDA fp16/bf16 tensors "
                "and no mask or a (batch, 1, 1, keys) key-padding mask; use 'auto' or 'sdpa'"
            )
        return "sdpa"
    if mask is None or bool(mask.all()):
        return "flash"
    return "flash_varlen"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v; a query with no allowed key returns zeros."""
    kernel = select_backend(q, mask, backend)
    if kernel == "flash":
        return flash_attention(q, k, v)
    if kernel == "flash_varlen":
        out = flash_attention_key_padding(q, k, v, mask)  # type: ignore[arg-type]
        if out is not None:
            return out
    return sdpa_attention(q, k, v, mask)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    # SDPA returns NaN for a query whose keys are all masked (and NaN gradients). Let such
    # rows attend everything, then zero their output so they contribute nothing.
    has_key = mask.any(dim=-1, keepdim=True)
    safe_mask = mask | ~has_key
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe_mask)
    return out * has_key.to(out.dtype)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    flash_func, _ = _flash_functions()  # type: ignore[misc]
    out = flash_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def flash_attention_key_padding(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    varlen_func: Callable[..., Any] | None = None,
) -> torch.Tensor | None:
    """Key-padding attention through flash-attn's varlen kernel: every query is kept, the
    masked keys are packed out. Returns None when some sample has no allowed key."""
    if varlen_func is None:
        varlen_func = _flash_functions()[1]  # type: ignore[index]
    batch, heads, num_q, head_dim = q.shape
    num_k = k.shape[2]
    key_mask = mask.reshape(mask.shape[0], num_k).expand(batch, num_k)
    key_counts = key_mask.sum(dim=1, dtype=torch.int32)
    counts_host = key_counts.cpu()
    if int(counts_host.min()) == 0:
        return None
    keep = key_mask.reshape(-1).nonzero().squeeze(1)
    k_packed = k.transpose(1, 2).reshape(batch * num_k, heads, head_dim).index_select(0, keep)
    v_packed = v.transpose(1, 2).reshape(batch * num_k, heads, head_dim).index_select(0, keep)
    q_packed = q.transpose(1, 2).reshape(batch * num_q, heads, head_dim)
    zero = torch.zeros(1, dtype=torch.int32, device=q.device)
    cu_seqlens_k = torch.cat([zero, key_counts.cumsum(0, dtype=torch.int32)])
    cu_seqlens_q = torch.arange(0, batch + 1, dtype=torch.int32, device=q.device) * num_q
    out = varlen_func(
        q_packed,
        k_packed,
        v_packed,
        cu_seqlens_q,
        cu_seqlens_k,
        num_q,
        int(counts_host.max()),
    )
    return out.reshape(batch, num_q, heads, head_dim).transpose(1, 2)
