import math

import pytest
import torch

from omni_train.models.attention import attention, flash_attention_key_padding


def reference_attention(q, k, v, mask=None):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is None:
        return scores.softmax(-1) @ v
    mask = mask.expand_as(scores)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    weights = torch.where(mask.any(-1, keepdim=True), weights, torch.zeros_like(weights))
    return weights @ v


def qkv(batch=2, heads=3, nq=5, nk=7, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, nq, dim), (batch, heads, nk, dim), (batch, heads, nk, dim)]
    return [torch.randn(s, generator=gen, requires_grad=True) for s in shapes]


def compare_forward_backward(mask, backend="sdpa"):
    q, k, v = qkv()
    out = attention(q, k, v, mask, backend=backend)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q2, k2, v2, mask)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q2, k2, v2))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    return out


def test_unmasked_matches_reference():
    compare_forward_backward(None)


def test_key_padding_mask_matches_reference():
    mask = torch.tensor([[True] * 7, [True, True, True, False, False, False, False]])
    compare_forward_backward(mask[:, None, None, :])


def test_general_mask_matches_reference():
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 3, 5, 7, generator=gen) > 0.4
    mask[..., 0] = True
    compare_forward_backward(mask)


def test_fully_masked_rows_give_zeros_without_nan():
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    mask[0, :, 2] = False  # query 2 of sample 0 may attend nothing
    mask[1] = False  # sample 1 may attend nothing at all
    out = compare_forward_backward(mask)
    assert out[0, :, 2].abs().max() == 0
    assert out[1].abs().max() == 0
    assert out[0, :, 1].abs().max() > 0


def test_auto_on_cpu_uses_the_exact_path():
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])[:, None, None, :]
    compare_forward_backward(mask, backend="auto")


def test_flash_backend_refuses_cpu_tensors():
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="flash"):
        attention(q, k, v, backend="flash")


def test_unknown_backend_is_rejected():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="backend"):
        attention(q, k, v, backend="xformers")


def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
    """flash-attn's varlen calling convention ((tokens, heads, dim) packed), computed exactly."""
    outs = []
    for i in range(len(cu_q) - 1):
        qi = q[cu_q[i] : cu_q[i + 1]].transpose(0, 1)
        ki = k[cu_k[i] : cu_k[i + 1]].transpose(0, 1)
        vi = v[cu_k[i] : cu_k[i + 1]].transpose(0, 1)
        assert qi.shape[1] <= max_q and ki.shape[1] <= max_k
        outs.append(reference_attention(qi, ki, vi).transpose(0, 1))
    return torch.cat(outs)


def test_key_padding_packing_for_varlen_kernel():
    q, k, v = qkv(nq=4, nk=9)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 2:5] = False
    mask[1, 6:] = False
    mask = mask[:, None, None, :]
    out = flash_attention_key_padding(q, k, v, mask, varlen_func=fake_varlen)
    torch.testing.assert_close(out, reference_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_varlen_declines_a_sample_without_keys():
    q, k, v = qkv()
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[1] = False
    assert flash_attention_key_padding(q, k, v, mask, varlen_func=fake_varlen) is None
