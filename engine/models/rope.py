"""Rotary frequency tables for the rope types the supported families use: default, linear, dynamic (NTK),
llama3 and yarn. Formulas follow transformers' modeling_rope_utils, so a table matches HF's cos/sin.

The engine builds one table for every position up to max_positions and shares it across steps, which HF's
"dynamic" type cannot be: HF recomputes inv_freq in each forward from the current sequence length (unscaled
up to max_position_embeddings, a larger base beyond). vLLM instead fixes the base once, as for a sequence of
max_position_embeddings * factor tokens, and uses that table for every position; so does this module. A model
with dynamic rope therefore differs from HF on sequences shorter than that length, as it does under vLLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class RopeParameters:
    rope_type: str
    base: float
    rot_dim: int  # rotated dims per head: head_dim * partial_rotary_factor
    factor: float = 1.0  # linear, dynamic, llama3, yarn
    original_max_positions: int | None = None  # llama3, yarn: pretraining context; dynamic: max_position_embeddings
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    attention_factor: float | None = None  # yarn: explicit cos/sin scale (else derived from factor, mscale)
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn: round the correction range to whole dims


def _field(params: dict, key: str, rope_type: str):
    if params.get(key) is None:
        raise ValueError(f"rope type {rope_type!r} needs rope parameter {key!r}, which the config lacks")
    return params[key]


def rope_parameters(hf_config) -> RopeParameters:
    """Read the rope settings of an HF config. transformers 5 keeps them all (rope_theta and
    partial_rotary_factor included) in the `rope_parameters` dict; a 4.x-style config has a `rope_scaling`
    dict (type under "type" or "rope_type") beside top-level rope_theta / partial_rotary_factor."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    base = float(params.get("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0))
    partial = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None) or 1.0)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    rot_dim = int(head_dim * partial)
    if rot_dim < 2 or rot_dim % 2:
        raise ValueError(
            f"rotary dim {rot_dim} (head_dim {head_dim} * partial_rotary_factor {partial}) must be even and at least 2"
        )
    common = dict(rope_type=rope_type, base=base, rot_dim=rot_dim)
    if rope_type == "default":
        return RopeParameters(**common)
    if rope_type in ("linear", "dynamic"):
        return RopeParameters(
            **common,
            factor=float(_field(params, "factor", rope_type)),
            original_max_positions=hf_config.max_position_embeddings,
        )
    original = (
        params.get("original_max_position_embeddings")
        or getattr(hf_config, "original_max_position_embeddings", None)
        or hf_config.max_position_embeddings
    )
    if rope_type == "llama3":
        return RopeParameters(
            **common,
            factor=float(_field(params, "factor", rope_type)),
            original_max_positions=original,
            low_freq_factor=float(_field(params, "low_freq_factor", rope_type)),
            high_freq_factor=float(_field(params, "high_freq_factor", rope_type)),
        )
    # yarn: without a factor, the ratio of the extended context to the pretraining one (as DeepSeek-V3 configs).
    factor = params.get("factor") or hf_config.max_position_embeddings / original
    return RopeParameters(
        **common,
        factor=float(factor),
        original_max_positions=original,
        attention_factor=params.get("attention_factor"),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(p: RopeParameters, base_powers: torch.Tensor) -> tuple[torch.Tensor, float]:
    # Dims that turn more than beta_fast times over the pretraining context keep their frequency; dims that
    # turn fewer than beta_slow times are interpolated (divided by factor); a linear ramp blends those between.
    def dim_for(rotations: float) -> float:
        return p.rot_dim * math.log(p.original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(p.base))

    low, high = dim_for(p.beta_fast), dim_for(p.beta_slow)
    if p.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, p.rot_dim - 1)
    if low == high:
        high += 0.001  # a one-dim ramp would divide by zero
    ramp = ((torch.arange(p.rot_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # the weight of the original frequency; HF's expression, so the table matches it bit for bit
    inv_freq = 1.0 / (p.factor * base_powers) * (1 - keep) + 1.0 / base_powers * keep
    if p.attention_factor is not None:
        scale = float(p.attention_factor)
    elif p.mscale and p.mscale_all_dim:
        scale = _yarn_mscale(p.factor, p.mscale) / _yarn_mscale(p.factor, p.mscale_all_dim)
    else:
        scale = _yarn_mscale(p.factor)
    return inv_freq, scale


def _llama3(p: RopeParameters, inv_freq: torch.Tensor) -> torch.Tensor:
    # Long wavelengths (beyond the pretraining context / low_freq_factor) are divided by factor, short ones
    # (below context / high_freq_factor) kept, and those between blended smoothly.
    wavelen = 2 * math.pi / inv_freq
    smooth = (p.original_max_positions / wavelen - p.low_freq_factor) / (p.high_freq_factor - p.low_freq_factor)
    blended = (1 - smooth) * inv_freq / p.factor + smooth * inv_freq
    scaled = torch.where(wavelen > p.original_max_positions / p.low_freq_factor, inv_freq / p.factor, blended)
    return torch.where(wavelen < p.original_max_positions / p.high_freq_factor, inv_freq, scaled)


def llama3_from_freq_factors(
    freq_factors: torch.Tensor, base: float, rot_dim: int, original_max_positions: int | None = None
) -> dict | None:
    """The HF llama3 rope parameters (factor, low/high_freq_factor, original_max_position_embeddings) whose
    table divides frequency i by freq_factors[i], as a GGUF's rope_freqs tensor does; None when every factor
    is 1 (no scaling). ValueError when no llama3 curve gives these factors.

    _llama3 divides by 1 below wavelength context / high_freq_factor, by `factor` above context /
    low_freq_factor, and between them by 1 / ((1 - s) / factor + s), s linear in 1 / wavelength: the factors
    fix `factor` and the two wavelength bounds. The context is `original_max_positions` when known, else the
    longer bound (so low_freq_factor is 1, as in every Llama 3.x).
    """
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)
    if freq_factors.shape != inv_freq.shape:
        raise ValueError(f"{freq_factors.numel()} frequency factors for {inv_freq.numel()} rotary frequencies")
    f = freq_factors.double()
    x = inv_freq.double() / (2 * math.pi)  # 1 / wavelength
    factor = f.max().item()
    if not f.min().item() >= 1.0:  # llama3 only ever divides by 1 or more (and NaN is no factor)
        raise ValueError("the rope frequency factors do not follow Llama 3's scaling curve")
    if factor == 1.0:
        return None
    kept, scaled = f == 1.0, f == factor
    blend = ~kept & ~scaled
    s = (1 / f[blend] - 1 / factor) / (1 - 1 / factor)  # each in-between frequency's blend weight
    # s = (x - x_low) / (x_high - x_low): 0 at the long-wavelength bound, 1 at the short one
    if len(s) >= 2:
        slope, intercept = torch.linalg.lstsq(torch.stack([x[blend], torch.ones_like(s)], 1), s[:, None]).solution
        x_low, x_high = (-intercept / slope).item(), ((1 - intercept) / slope).item()
    else:  # the bounds are free within the gaps between the classes: any choice there gives the same factors
        lo, hi = x[scaled].max().item(), x[kept].min().item() if kept.any() else math.inf
        if len(s) == 1:
            x0, s0 = x[blend].item(), s.item()
            t = min((x0 - lo) / s0, (hi - x0) / (1 - s0)) / 2
            x_low, x_high = x0 - s0 * t, x0 + (1 - s0) * t
        else:
            x_low, x_high = (lo + (hi - lo) / 3, lo + 2 * (hi - lo) / 3) if kept.any() else (2 * lo, 3 * lo)
    if 0 < x_low < x_high:
        context = original_max_positions or round(1 / x_low)
        exact = (factor, context * x_low, context * x_high)
        target = inv_freq / freq_factors.float()
        # rounded first, for the values a config states (8.0, 1.0, 4.0); the fit is only as exact as float32
        for scale, low, high in ([round(v, 4) for v in exact], exact):
            params = RopeParameters("llama3", base, rot_dim, scale, context, low, high)
            if torch.allclose(_llama3(params, inv_freq), target, rtol=1e-5, atol=0):
                return dict(
                    rope_type="llama3",
                    factor=scale,
                    low_freq_factor=low,
                    high_freq_factor=high,
                    original_max_position_embeddings=context,
                )
    raise ValueError("the rope frequency factors do not follow Llama 3's scaling curve")


def inv_freq_and_scale(p: RopeParameters) -> tuple[torch.Tensor, float]:
    """-> (inv_freq [rot_dim / 2] float32 on the CPU, the factor HF multiplies cos and sin by)."""
    base = p.base
    if p.rope_type == "dynamic":
        # HF's NTK base for a sequence of factor * max_position_embeddings tokens, fixed (see the module note).
        seq_len = p.factor * p.original_max_positions
        base *= (p.factor * seq_len / p.original_max_positions - (p.factor - 1)) ** (p.rot_dim / (p.rot_dim - 2))
    base_powers = base ** (torch.arange(0, p.rot_dim, 2, dtype=torch.float32) / p.rot_dim)  # [rot_dim / 2]
    if p.rope_type == "yarn":
        return _yarn(p, base_powers)
    inv_freq = 1.0 / base_powers
    if p.rope_type == "linear":
        return inv_freq / p.factor, 1.0
    if p.rope_type == "llama3":
        return _llama3(p, inv_freq), 1.0
    return inv_freq, 1.0


def cos_sin_cache(p: RopeParameters, max_positions: int, device: torch.device | str) -> torch.Tensor:
    """-> [max_positions, rot_dim] float32: row t is cos(t * inv_freq) | sin(t * inv_freq), times the attention
    scaling, the layout kernels.triton_rotary reads."""
    inv_freq, scale = inv_freq_and_scale(p)
    t = torch.arange(max_positions, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq.to(device))  # [max_positions, rot_dim / 2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1) * scale
