"""GGUF's quantized blocks read: the bytes of each block type kernels/quant.py imports, decoded to codes and
their scales (the types a kept format holds as they are) or to float32 weights (the rest), as ggml and gguf-py
decode them."""

from __future__ import annotations

import torch


def as_bytes(raw) -> torch.Tensor:
    if isinstance(raw, torch.Tensor):
        return raw.detach().cpu().contiguous().view(torch.uint8).reshape(-1)
    if isinstance(raw, bytes | bytearray | memoryview):
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    # A numpy array (gguf's reader hands out read-only memory maps): copied, as the layout changes anyway.
    return torch.tensor(raw).view(torch.uint8).reshape(-1)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] bytes -> float32 [n] (little-endian float16)."""
    return b.contiguous().view(torch.float16).float().reshape(-1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32]: low nibbles are elements 0..15, high nibbles 16..31 (GGUF's legacy blocks)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes of a little-endian uint32 -> [n, 32] bits, bit j for element j."""
    bits = torch.arange(8, dtype=torch.int16)
    return ((qh.to(torch.int16)[..., None] >> bits) & 1).reshape(qh.shape[0], 32)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes of 6-bit sub-block scales and mins -> ([n, 8], [n, 8]) (ggml's get_scale_min_k4)."""
    s = s.to(torch.int16)
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    mn = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return sc, mn


def k_parts(b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Q4_K/Q5_K blocks [n, bytes] -> (d, dmin [n] float32, sc, m [n, 8] 0..63, the low 4 bits of the codes
    [n, 256] int16)."""
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    qs = b[:, -128:].reshape(n, 4, 1, 32)  # 4 chunks of 64 weights: low nibbles, then high nibbles
    q = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, 256).to(torch.int16)
    return _f16(b[:, 0:2]), _f16(b[:, 2:4]), sc, mn, q


def decode(b: torch.Tensor, name: str):
    """GGUF blocks [n, bytes] -> (codes [n, W], d [n, W/32], m [n, W/32] or None), exact for the types kept as
    codes (Q8_0, Q5_0 -> q8g32; Q4_0, Q4_1 -> q4g32), or float32 weights [n, W] for the rest, computed as
    ggml (and gguf-py) dequantizes them (Q4_K is kept as it is: k_parts)."""
    n = b.shape[0]
    if name == "Q8_0":
        return b[:, 2:].contiguous().view(torch.int8), _f16(b[:, :2])[:, None], None
    if name == "Q4_0":
        d = _f16(b[:, :2])[:, None]
        return _nibbles(b[:, 2:18]), d, -8 * d
    if name == "Q4_1":
        return _nibbles(b[:, 4:20]), _f16(b[:, :2])[:, None], _f16(b[:, 2:4])[:, None]
    if name == "Q5_0":
        q = _nibbles(b[:, 6:22]).to(torch.int16) | (_high_bits(b[:, 2:6]) << 4)
        return (q - 16).to(torch.int8), _f16(b[:, :2])[:, None], None
    if name == "Q5_1":
        q = _nibbles(b[:, 8:24]).to(torch.int16) | (_high_bits(b[:, 4:8]) << 4)
        return q.float() * _f16(b[:, :2])[:, None] + _f16(b[:, 2:4])[:, None]
    if name == "Q5_K":
        d, dmin, sc, mn, q = k_parts(b)
        qh = b[:, 16:48].to(torch.int16)  # bit s of byte l: the fifth bit of sub-block s's weight l
        q = q.view(n, 8, 32) | (((qh[:, None, :] >> torch.arange(8, dtype=torch.int16)[:, None]) & 1) << 4)
        scale, offset = d[:, None] * sc.float(), dmin[:, None] * mn.float()  # [n, 8], as ggml: float32 products
        return (scale[..., None] * q.float() - offset[..., None]).reshape(n, 256)
    assert name == "Q6_K", name
    ql, qh = b[:, 0:128].reshape(n, 2, 1, 2, 32), b[:, 128:192].reshape(n, 2, 1, 32).to(torch.int16)
    sc = b[:, 192:208].contiguous().view(torch.int8).float()  # [n, 16]: one per 16 weights
    d = _f16(b[:, 208:210])[:, None]
    # Each 128-weight half: groups g = 0..3 of 32 take ql[l] low, ql[l+32] low, ql[l] high, ql[l+32] high nibbles
    # and bits 2g, 2g+1 of qh[l].
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(n, 2, 4, 32).to(torch.int16)
    high = (qh >> (2 * torch.arange(4, dtype=torch.int16))[:, None]) & 3
    q = ((low | (high << 4)) - 32).reshape(n, 16, 16).float()
    return ((d * sc)[..., None] * q).reshape(n, 256)
