"""The Triton rotary embedding against its torch twin (neox and GPT-J layouts, partial rotary, GQA), and the twin
against transformers' apply_rotary_pos_emb and against rotation written as complex multiplication."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kernels.triton_rotary import rotary_embedding, rotary_embedding_ref

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3)}
# Out of order, repeated, and the table's first and last rows.
POSITIONS = torch.tensor([5, 0, 63, 17, 5, 40, 2])


def make_cache(rot_dim, max_positions=64, base=100.0):
    # A small base so every pair turns through large angles within the 64 positions.
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [max_positions, rot_dim / 2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def make_qkv(seed, num_heads, num_kv_heads, head_dim, dtype):
    """q, k as views into one fused [T, (H + 2 * KVH) * D] projection output, as the model hands them over."""
    g = torch.Generator().manual_seed(seed)
    T, H, KVH, D = len(POSITIONS), num_heads, num_kv_heads, head_dim
    qkv = torch.randn(T, (H + 2 * KVH) * D, generator=g).to(dtype)
    q = qkv[:, : H * D].view(T, H, D)
    k = qkv[:, H * D : (H + KVH) * D].view(T, KVH, D)
    return qkv, q, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rot_dim", [32, 16, 12])  # full, half, and a pair count that is not a power of two
def test_kernel_matches_reference(dtype, is_neox, rot_dim):
    qkv, q, k = make_qkv(0, 6, 2, 32, dtype)  # GQA: 6 query heads over 2 kv heads
    # Poison what must not be touched: the dims past rot_dim, and v.
    q[..., rot_dim:] = float("nan")
    k[..., rot_dim:] = float("nan")
    qkv[:, 8 * 32 :] = float("nan")
    expected = qkv.clone()
    rotary_embedding_ref(
        POSITIONS,
        expected[:, : 6 * 32].view(-1, 6, 32),
        expected[:, 6 * 32 : 8 * 32].view(-1, 2, 32),
        make_cache(rot_dim),
        is_neox,
    )
    before = qkv.clone()
    rotary_embedding(POSITIONS, q, k, make_cache(rot_dim), is_neox)
    torch.testing.assert_close(qkv, expected, equal_nan=True, **TOL[dtype])
    assert not torch.allclose(q[..., :rot_dim], before[:, : 6 * 32].view(-1, 6, 32)[..., :rot_dim])  # it rotated
    assert torch.isnan(qkv[:, 8 * 32 :]).all() and not torch.isnan(q[..., :rot_dim]).any()


def test_reference_neox_is_transformers_apply_rotary_pos_emb():
    _, q, k = make_qkv(1, 4, 2, 16, torch.float32)
    cache = make_cache(16)
    cos, sin = cache[POSITIONS].chunk(2, dim=-1)
    # HF's tables repeat the half-width angles across the head: [T, D]. Its q, k are [batch, heads, T, D].
    cos, sin = torch.cat((cos, cos), dim=-1)[None], torch.cat((sin, sin), dim=-1)[None]
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    rotary_embedding_ref(POSITIONS, q, k, cache, True)
    torch.testing.assert_close(q, hf_q[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, hf_k[0].transpose(0, 1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("is_neox", [True, False])
def test_reference_turns_each_pair_as_a_complex_number(is_neox):
    # Pair i is the complex number x1 + i*x2, turned by exp(i * position * inv_freq[i]); the tail is untouched.
    rot_dim, base = 12, 100.0
    _, q, k = make_qkv(2, 3, 3, 16, torch.float32)
    original = q.clone()
    rotary_embedding_ref(POSITIONS, q, k, make_cache(rot_dim, base=base), is_neox)
    pairs = (
        original[..., :rot_dim].view(len(POSITIONS), 3, 2, rot_dim // 2).transpose(-1, -2)
        if is_neox
        else original[..., :rot_dim].view(len(POSITIONS), 3, rot_dim // 2, 2)
    )
    angles = POSITIONS[:, None, None].double() / base ** (torch.arange(0, rot_dim, 2).double() / rot_dim)
    turned = torch.view_as_complex(pairs.double().contiguous()) * torch.polar(torch.ones_like(angles), angles)
    turned = torch.view_as_real(turned)  # [T, heads, rot_dim / 2, 2]
    rotated = turned.transpose(-1, -2).flatten(-2) if is_neox else turned.flatten(-2)
    torch.testing.assert_close(q[..., :rot_dim].double(), rotated, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q[..., rot_dim:], original[..., rot_dim:], rtol=0, atol=0)


@pytest.mark.parametrize("rotate", [rotary_embedding, rotary_embedding_ref])
def test_no_tokens_is_a_no_op_and_still_checked(rotate):
    """A step can carry no token to rotate: kernel and twin accept it (no position to look up, no program to
    launch) and leave q and k as they are, but refuse bad arguments just as for a full batch."""
    qkv = torch.randn(0, (4 + 2 * 2) * 16)  # the fused projection of no tokens, q and k views into it
    q, k = qkv[:, : 4 * 16].view(0, 4, 16), qkv[:, 4 * 16 : 6 * 16].view(0, 2, 16)
    no_positions = torch.zeros(0, dtype=torch.int64)
    assert rotate(no_positions, q, k, make_cache(16), True) is None
    assert q.shape == (0, 4, 16) and k.shape == (0, 2, 16)
    with pytest.raises(ValueError, match="positions must be"):
        rotate(no_positions.int(), q, k, make_cache(16), True)
    with pytest.raises(ValueError, match="k is"):
        rotate(no_positions, q, k.half(), make_cache(16), True)
    with pytest.raises(ValueError, match="rot_dim 20"):
        rotate(no_positions, q, k, torch.zeros(64, 20), True)


@pytest.mark.parametrize(
    "case,message",
    [
        (lambda p, q, k, c: (p.int(), q, k, c), "positions must be"),
        (lambda p, q, k, c: (p, q.flatten(1), k, c), "q must be"),
        (lambda p, q, k, c: (p, q, k[:-1], c), "k must be"),
        (lambda p, q, k, c: (p, q.long(), k, c), "q has dtype"),
        (lambda p, q, k, c: (p, q.transpose(1, 2), k, c), "stride 1"),
        (lambda p, q, k, c: (p, q, k.half(), c), "k is"),
        (lambda p, q, k, c: (p, q, k[..., :8], c), "k is"),
        (lambda p, q, k, c: (p, q, k, c.half()), "cos_sin_cache must be"),
        (lambda p, q, k, c: (p, q, k, torch.zeros(64, 20)), "rot_dim 20"),
        (lambda p, q, k, c: (p, q, k, torch.zeros(64, 9)), "rot_dim 9"),
    ],
)
def test_bad_inputs_are_refused(case, message):
    _, q, k = make_qkv(3, 4, 2, 16, torch.float32)
    args = case(POSITIONS, q, k, make_cache(16))
    for fn in (rotary_embedding, rotary_embedding_ref):
        with pytest.raises(ValueError, match=message):
            fn(*args, True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_neox", [True, False])
def test_kernel_matches_reference_on_gpu(dtype, is_neox):
    # Llama-3-8B's attention shape: 32 query heads over 8 kv heads of 128 dims, over a 4096-position table.
    T, H, KVH, D = 300, 32, 8, 128
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(T, (H + 2 * KVH) * D, generator=g).to(dtype).cuda()
    positions = torch.randint(0, 4096, (T,), generator=g).cuda()
    cache = make_cache(D, max_positions=4096, base=500000.0).cuda()
    expected = qkv.clone()
    rotary_embedding_ref(
        positions,
        expected[:, : H * D].view(T, H, D),
        expected[:, H * D : (H + KVH) * D].view(T, KVH, D),
        cache,
        is_neox,
    )
    rotary_embedding(
        positions, qkv[:, : H * D].view(T, H, D), qkv[:, H * D : (H + KVH) * D].view(T, KVH, D), cache, is_neox
    )
    torch.testing.assert_close(qkv, expected)
