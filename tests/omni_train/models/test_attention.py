import math

import pytest
import torch

from omni_train.models.attention import (
    attention,
    flash_attention_key_padding,
    sdpa_attention,
    select_backend,
)


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


@pytest.fixture
def fake_flash(monkeypatch):
    """flash-attn 'installed' and tensors 'on CUDA': the selection logic runs on CPU."""
    from omni_train.models import attention as module

    calls = []

    def dense(q, k, v):  # (batch, tokens, heads, dim) like flash_attn_func
        calls.append("flash")
        out = reference_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    def varlen(*args):
        calls.append("flash_varlen")
        return fake_varlen(*args)

    monkeypatch.setattr(module, "_flash_functions", lambda: (dense, varlen))
    monkeypatch.setattr(module, "_on_cuda", lambda q: True)
    return calls


def half_qkv():
    return [t.detach().to(torch.bfloat16) for t in qkv()]


def test_backend_selection_without_flash_attn_is_sdpa():
    q, _, _ = qkv()
    assert select_backend(q) == "sdpa"
    assert select_backend(q.to(torch.bfloat16), backend="auto") == "sdpa"  # CPU


def test_backend_selection_with_flash_attn(fake_flash):
    q, k, v = half_qkv()
    padding = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    assert select_backend(q) == "flash"
    assert select_backend(q, padding) == "flash"  # every key allowed: no packing needed
    padding[1, ..., 5:] = False
    assert select_backend(q, padding) == "flash_varlen"  # key lengths differ: pack them
    per_query = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    assert select_backend(q, per_query) == "sdpa"  # flash-attn cannot take a per-query mask
    assert select_backend(q.float()) == "sdpa"  # flash-attn has no fp32 kernel
    assert select_backend(q, backend="sdpa") == "sdpa"
    with pytest.raises(RuntimeError, match="flash"):
        select_backend(q, per_query, backend="flash")
    attention(q, k, v)
    attention(q, k, v, padding)
    attention(q, k, v, per_query)
    assert fake_flash == ["flash", "flash_varlen"]


def test_varlen_path_matches_sdpa_on_padded_keys(fake_flash):
    q, k, v = qkv()
    padding = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    padding[0, ..., 4:] = False
    from omni_train.models import attention as module

    packed = module.flash_attention_key_padding(q, k, v, padding, varlen_func=fake_varlen)
    torch.testing.assert_close(packed, sdpa_attention(q, k, v, padding), rtol=1e-5, atol=1e-5)


def test_joint_attention_mask_with_text_padding_and_reference_tokens():
    """The block's mask: [text (padded) | frame tokens | reference tokens] as keys."""
    text_len, frame_tokens, ref_tokens = 4, 6, 3
    keys = text_len + frame_tokens + ref_tokens
    q, k, v = qkv(nq=keys, nk=keys)
    text_keys = torch.tensor([[True] * 4, [True, True, False, False]])
    key_mask = torch.cat([text_keys, torch.ones(2, frame_tokens + ref_tokens, dtype=torch.bool)], 1)
    out = compare_forward_backward_with(q, k, v, key_mask[:, None, None, :])
    # The padded text keys really are ignored: changing them changes nothing.
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[1, :, 2:4] += 5.0
    v2[1, :, 2:4] += 5.0
    torch.testing.assert_close(sdpa_attention(q, k2, v2, key_mask[:, None, None, :]), out)


def compare_forward_backward_with(q, k, v, mask):
    out = sdpa_attention(q, k, v, mask)
    ref = reference_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    return out.detach()


def test_frame_local_audio_attention_equals_block_diagonal_masked_attention():
    """Folding frames into the batch is the same as full attention over all frames' audio
    tokens with a mask that lets frame j's video tokens see frame j's audio tokens only."""
    from omni_train.models.mmdit import FrameAudioCrossAttention, _split_heads

    torch.manual_seed(0)
    batch, frames, per_frame, slots, hidden, heads = 2, 3, 4, 5, 16, 2
    module = FrameAudioCrossAttention(hidden, heads, backend="sdpa")
    torch.nn.init.normal_(module.out.weight)
    video = torch.randn(batch, frames * per_frame, hidden)
    audio = torch.randn(batch, frames, slots, hidden)
    folded = module(video, audio)

    q = module.q_norm(_split_heads(module.q(module.norm(video)), heads))
    k, v = _split_heads(module.kv(audio.reshape(batch, frames * slots, hidden)), heads).chunk(2, -1)
    query_frame = torch.arange(frames).repeat_interleave(per_frame)
    key_frame = torch.arange(frames).repeat_interleave(slots)
    mask = (query_frame[:, None] == key_frame[None, :])[None, None]
    full = reference_attention(q, module.k_norm(k), v, mask)
    expected = module.out(full.transpose(1, 2).flatten(-2))
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        sdpa_attention(q, module.k_norm(k), v, mask), full, rtol=1e-5, atol=1e-5
    )
