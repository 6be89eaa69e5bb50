"""Rotary tables against transformers: inv_freq and attention scaling per rope type (ROPE_INIT_FUNCTIONS, the
model's default-rope function), and whole cos/sin tables and rotations against HF's rotary embedding modules."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from engine.models.rope import cos_sin_cache, inv_freq_and_scale, rope_parameters
from kernels.triton_rotary import rotary_embedding_ref


def llama31():
    # Llama 3.1 8B.
    return LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )


def qwen25_yarn():
    # Qwen2.5 7B with the rope_scaling its model card says to add for 128K contexts (the 4.x-style key).
    return Qwen2Config(
        hidden_size=3584,
        num_attention_heads=28,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    )


def yarn_mscale():
    # DeepSeek-style yarn: the attention factor is a ratio of two mscales, the factor given.
    return LlamaConfig(
        hidden_size=2048,
        num_attention_heads=16,
        max_position_embeddings=163840,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 1.0,
        },
    )


def yarn_untruncated():
    # gpt-oss-style yarn: an untruncated correction range and an explicit attention factor.
    return LlamaConfig(
        hidden_size=2880,
        num_attention_heads=45,
        head_dim=64,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "attention_factor": 1.25,
        },
    )


def linear(partial=None):
    extra = {} if partial is None else {"partial_rotary_factor": partial}
    return LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0, **extra},
    )


def dynamic():
    return LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    )


def qwen3_default():
    # Qwen3 0.6B: head_dim 128 is not hidden_size / heads (64), so it must be read from the config.
    return Qwen3Config(hidden_size=1024, num_attention_heads=16, head_dim=128, rope_theta=1e6)


HF_CASES = {
    "llama3": (llama31, lambda c: ROPE_INIT_FUNCTIONS["llama3"](c)),
    "yarn-qwen2.5": (qwen25_yarn, lambda c: ROPE_INIT_FUNCTIONS["yarn"](c)),
    "yarn-mscale": (yarn_mscale, lambda c: ROPE_INIT_FUNCTIONS["yarn"](c)),
    "yarn-untruncated": (yarn_untruncated, lambda c: ROPE_INIT_FUNCTIONS["yarn"](c)),
    "linear": (linear, lambda c: ROPE_INIT_FUNCTIONS["linear"](c)),
    "linear-partial": (lambda: linear(0.5), lambda c: ROPE_INIT_FUNCTIONS["linear"](c)),
    # vLLM's (and our) fixed table: HF's NTK base for a sequence of factor * max_position_embeddings tokens.
    "dynamic": (dynamic, lambda c: ROPE_INIT_FUNCTIONS["dynamic"](c, seq_len=2 * c.max_position_embeddings)),
    "default-llama": (
        lambda: LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_theta=500000.0),
        LlamaRotaryEmbedding.compute_default_rope_parameters,
    ),
    "default-qwen3": (qwen3_default, Qwen3RotaryEmbedding.compute_default_rope_parameters),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_inv_freq_and_scaling_match_transformers(case):
    make_config, hf = HF_CASES[case]
    config = make_config()
    params = rope_parameters(config)
    inv_freq, scale = inv_freq_and_scale(params)
    hf_inv_freq, hf_scale = hf(config)
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (params.rot_dim // 2,)
    torch.testing.assert_close(inv_freq, hf_inv_freq, rtol=0, atol=0)
    assert scale == pytest.approx(hf_scale, rel=1e-12)


def test_parameters_read_from_the_config():
    p = rope_parameters(llama31())
    assert (p.rope_type, p.base, p.rot_dim, p.factor, p.original_max_positions) == ("llama3", 500000.0, 128, 8.0, 8192)
    assert (p.low_freq_factor, p.high_freq_factor) == (1.0, 4.0)
    assert rope_parameters(qwen3_default()).rot_dim == 128
    assert rope_parameters(linear(0.5)).rot_dim == 64
    p = rope_parameters(qwen25_yarn())
    assert (p.rope_type, p.base, p.factor, p.original_max_positions) == ("yarn", 1e6, 4.0, 32768)
    assert rope_parameters(yarn_untruncated()).truncate is False


def test_a_4x_style_config_reads_like_a_5x_one():
    legacy = SimpleNamespace(
        hidden_size=4096,
        num_attention_heads=32,
        max_position_embeddings=8192,
        rope_theta=10000.0,
        rope_scaling={"type": "linear", "factor": 2.0},
    )
    assert rope_parameters(legacy) == rope_parameters(linear())
    plain = SimpleNamespace(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0, partial_rotary_factor=0.25)
    assert (rope_parameters(plain).rope_type, rope_parameters(plain).rot_dim) == ("default", 32)


def test_dynamic_differs_from_transformers_below_the_scaled_length():
    # HF starts unscaled (seq_len = max_position_embeddings); the shared table is scaled for every position.
    config = dynamic()
    hf_short, _ = ROPE_INIT_FUNCTIONS["dynamic"](config)
    inv_freq, _ = inv_freq_and_scale(rope_parameters(config))
    assert inv_freq[0] == hf_short[0] and (inv_freq[1:] < hf_short[1:]).all()


@pytest.mark.parametrize(
    "make_config,hf_module",
    [
        (llama31, LlamaRotaryEmbedding),
        (qwen25_yarn, Qwen2RotaryEmbedding),
        (yarn_mscale, LlamaRotaryEmbedding),
    ],
)
def test_tables_and_rotation_match_transformers(make_config, hf_module):
    config = make_config()
    positions = torch.tensor([0, 1, 777, 8191, 8192, 40000, 3])
    cache = cos_sin_cache(rope_parameters(config), 40001, "cpu")
    half = cache.shape[1] // 2
    assert cache.shape == (40001, 2 * half) and cache.dtype == torch.float32
    hf_cos, hf_sin = hf_module(config)(torch.zeros(1, dtype=torch.float32), positions[None])  # [1, T, head_dim]
    cos, sin = cache[positions].chunk(2, dim=-1)
    for ours, theirs in ((cos, hf_cos[0]), (sin, hf_sin[0])):
        torch.testing.assert_close(ours, theirs[:, :half], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours, theirs[:, half:], rtol=1e-5, atol=1e-5)
    # And the rotation: q [T, 4 heads, D], k [T, 2 heads, D] against HF's [batch, heads, T, D] convention.
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(len(positions), 4, 2 * half, generator=g), torch.randn(len(positions), 2, 2 * half, generator=g)
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos, hf_sin)
    rotary_embedding_ref(positions, q, k, cache, True)
    torch.testing.assert_close(q, hf_q[0].transpose(0, 1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k, hf_k[0].transpose(0, 1), rtol=1e-4, atol=1e-4)


def test_yarn_scales_cos_and_sin():
    cache = cos_sin_cache(rope_parameters(qwen25_yarn()), 4, "cpu")
    _, scale = inv_freq_and_scale(rope_parameters(qwen25_yarn()))
    assert scale == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)
    # Row 0 is cos(0) | sin(0): the scale itself, then zeros.
    torch.testing.assert_close(cache[0], torch.tensor([scale] * 64 + [0.0] * 64))


def with_rope(config, params):
    config.rope_parameters = params  # set after construction: transformers' own validation would refuse them first
    return config


def test_unsupported_rope_type_is_named():
    config = with_rope(LlamaConfig(), {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0]})
    with pytest.raises(ValueError, match="'longrope' is not supported"):
        rope_parameters(config)


def test_missing_scaling_field_is_named():
    config = with_rope(LlamaConfig(), {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0})
    with pytest.raises(ValueError, match="'high_freq_factor'"):
        rope_parameters(config)


def test_odd_rotary_dim_is_refused():
    config = with_rope(
        LlamaConfig(hidden_size=2048, num_attention_heads=32),
        {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.3},
    )
    with pytest.raises(ValueError, match="rotary dim 19"):
        rope_parameters(config)
