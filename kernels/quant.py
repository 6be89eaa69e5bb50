"""Weight-only quantized linear layers: the kept formats, GGUF import, the matmul ops, and their torch twins.

Formats (w is one weight; 32 consecutive weights of a row, a block, share d and m):
  q8g32  w = d * q,      q int8         (GGUF Q8_0's grid)      8.5 bits/weight (fp16 d)
  q4g32  w = d * q + m,  q in 0..15     (GGUF Q4_1's grid)      5.0 bits/weight (fp16 d and m)
  q4k    w = d * q + m,  q in 0..15,    (GGUF Q4_K's grid)      4.625 bits/weight
         d = D * s, m = -Dm * t with s, t in 0..63 per block and D, Dm float16 per 256 weights (a super-block)
q4k is Q4_K kept as it is: a Q4_K file's weights exactly (d and m computed in float32, as ggml does), in 7.5%
fewer bytes than q4g32, which a decode step streams once per token.

In memory the columns (output features) go in panels of 8, each panel a run of 32-weight blocks, laid out for the
CPU kernel's int8 dot products (kernels/csrc/quant_gemm.h says why):
  codes   q8g32: int8  [N/8, K/32, 256]  byte 32t + 4c + j       = code of column c, k = 4t + j
          q4g32, q4k: uint8 [N/8, K/32, 128]  byte 32p + 4c + j holds code(c, k = 8p + j) | code(c, 8p + 4 + j) << 4
  scales  q8g32, q4g32: float16 [N/8, K/32, 8]  (d of column c in the block);  q4k: uint8 (s)
  mins    q4g32: float16 [N/8, K/32, 8]  (m);  q4k: uint8 (t);  q8g32: none
  supers  q4k: float16 [N/8, K/256, 16]  (D of the 8 columns, then their Dm)
N is padded up to a multiple of 8, K to one of 32 (256 for q4k) with zero weights; x's columns past K never meet
them.

The matmul runs the compiled C++ kernel on the CPU (activations quantized to int8 per 32, llama.cpp's way), the
Triton kernel on CUDA (integer codes times x as given, each block's scale applied to the partial sums), and this
module's twin (dequantize, then a float32 matmul) where neither applies (or the C++ kernels cannot be built).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from kernels import cpu_ops, gguf_blocks

logger = logging.getLogger(__name__)

FORMATS = ("q8g32", "q4g32", "q4k")
GROUP = 32  # weights per scale
SUPER = 256  # weights per q4k super-block (D and Dm)
PANEL = 8  # columns per panel
_CODE_BYTES = {"q8g32": 256, "q4g32": 128, "q4k": 128}  # per panel and block
_ROWS_PER_PASS = 4096  # rows quantized or decoded at a time (a multiple of PANEL)

# GGUF block types this module imports: ggml type id -> (name, weights per block, bytes per block, kept format)
GGUF_TYPES = {
    2: ("Q4_0", 32, 18, "q4g32"),
    3: ("Q4_1", 32, 20, "q4g32"),
    6: ("Q5_0", 32, 22, "q8g32"),
    7: ("Q5_1", 32, 24, "q8g32"),
    8: ("Q8_0", 32, 34, "q8g32"),
    12: ("Q4_K", 256, 144, "q4k"),
    13: ("Q5_K", 256, 176, "q8g32"),
    14: ("Q6_K", 256, 210, "q8g32"),
}


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A [N, K] weight (out_features, in_features) kept quantized; the tensors are in the panel layout above."""

    format: str
    shape: tuple[int, int]
    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None
    supers: torch.Tensor | None = None  # q4k only

    def __post_init__(self) -> None:
        n, k = self.shape
        panels, blocks = -(-n // PANEL), padded_k(self.format, k) // GROUP
        assert self.format in FORMATS, self.format
        assert self.codes.shape == (panels, blocks, _CODE_BYTES[self.format]), (self.codes.shape, self.shape)
        scale_dtype = torch.uint8 if self.format == "q4k" else torch.float16
        assert self.scales.shape == (panels, blocks, PANEL) and self.scales.dtype == scale_dtype
        assert (self.mins is not None) == (self.format != "q8g32")
        assert self.mins is None or (self.mins.shape == self.scales.shape and self.mins.dtype == scale_dtype)
        assert (self.supers is not None) == (self.format == "q4k")
        assert self.supers is None or self.supers.shape == (panels, blocks * GROUP // SUPER, 2 * PANEL)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """(codes, scales, mins, supers), as the C++ kernels take them."""
        return self.codes, self.scales, self.mins, self.supers

    @property
    def nbytes(self) -> int:
        """Bytes resident for this weight (all its tensors, padding included)."""
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)

    def map(self, fn) -> QuantizedWeight:
        """The same weight with fn applied to each of its tensors (a move, a copy)."""
        apply = lambda t: None if t is None else fn(t)  # noqa: E731
        return QuantizedWeight(self.format, self.shape, *(apply(t) for t in self.tensors()))

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return self.map(lambda t: t.to(device))


def padded_k(fmt: str, k: int) -> int:
    """K as a weight of format fmt holds it: up to a whole block (a whole super-block for q4k)."""
    unit = SUPER if fmt == "q4k" else GROUP
    return -(-k // unit) * unit


def _cat_panels(fmt: str, shape: tuple[int, int], parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Weights of one format and K whose panels follow one another -> one weight of shape `shape`."""
    cat = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
    return QuantizedWeight(fmt, shape, *(cat(ts) for ts in zip(*(p.tensors() for p in parts), strict=True)))


def concat(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Weights of one format and K stacked along N (a fused q/k/v or gate/up projection): each weight but the last
    must have N a multiple of PANEL, so that its panels end where the next one's begin."""
    first = weights[0]
    if any(w.format != first.format or w.shape[1] != first.shape[1] for w in weights):
        raise ValueError("only weights of one format and in_features can be stacked")
    if any(w.shape[0] % PANEL for w in weights[:-1]):
        raise ValueError(f"stacked weights but the last need out_features a multiple of {PANEL}")
    return _cat_panels(first.format, (sum(w.shape[0] for w in weights), first.shape[1]), weights)


def format_nbytes(fmt: str, shape: tuple[int, int]) -> int:
    """Bytes a [N, K] weight holds in format fmt (what QuantizedWeight.nbytes will say), for memory estimates."""
    _check_format(fmt)
    n, k = shape
    blocks = padded_k(fmt, k) // GROUP
    per_block = _CODE_BYTES[fmt] + PANEL * {"q8g32": 2, "q4g32": 4, "q4k": 2}[fmt]  # codes, then d (and m)
    supers = blocks * GROUP // SUPER * 2 * PANEL * 2 if fmt == "q4k" else 0  # D and Dm, float16
    return -(-n // PANEL) * (blocks * per_block + supers)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantized format {fmt!r}: expected one of {FORMATS}")


# ---- packing: per-row codes [N, K] + per-block d, m [N, K/32] <-> the panel layout ------------------------------


def _pack(
    fmt: str,
    shape: tuple[int, int],
    codes: torch.Tensor,
    d: torch.Tensor,
    m: torch.Tensor | None,
    supers: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> QuantizedWeight:
    """codes: [N, K] integer (K padded as padded_k says); d and m: [N, K/32], float (q4k: its s and t, 0..63);
    supers (q4k): its D and Dm, float [N, K/256] -> QuantizedWeight."""
    n, k = codes.shape
    panels = -(-n // PANEL)

    def whole_panels(t: torch.Tensor) -> torch.Tensor:  # zero columns up to a whole panel
        return t if panels * PANEL == n else torch.cat([t, t.new_zeros(panels * PANEL - n, t.shape[1])])

    codes = whole_panels(codes)
    blocks = k // GROUP

    def per_block(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # t: [N, B] -> [N/8, B, 8]
        return whole_panels(t).reshape(panels, PANEL, -1).transpose(1, 2).to(dtype).contiguous()

    if fmt == "q8g32":
        # codes: [panel, c, block, t, j] -> [panel, block, t, c, j]
        c = codes.to(torch.int8).reshape(panels, PANEL, blocks, 8, 4).permute(0, 2, 3, 1, 4)
        packed = c.reshape(panels, blocks, 256).contiguous()
    else:
        # codes: [panel, c, block, p, h, j] -> [panel, block, p, c, h, j]; h = 0 the low nibble, 1 the high one
        c = codes.to(torch.uint8).reshape(panels, PANEL, blocks, 4, 2, 4).permute(0, 2, 3, 1, 4, 5)
        packed = (c[..., 0, :] | (c[..., 1, :] << 4)).reshape(panels, blocks, 128).contiguous()
    scale_dtype = torch.uint8 if fmt == "q4k" else torch.float16
    mins = None if m is None else per_block(m, scale_dtype)
    packed_supers = None
    if supers is not None:  # [N/8, K/256, 16]: the panel's 8 D, then its 8 Dm
        packed_supers = torch.cat([per_block(t, torch.float16) for t in supers], dim=2).contiguous()
    return QuantizedWeight(fmt, shape, packed, per_block(d, scale_dtype), mins, packed_supers)


def _unpack_codes(qw: QuantizedWeight, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Codes as int16 [len(rows) or padded N, padded K]: the weight's rows `rows` (all when None)."""
    panels, blocks, size = qw.codes.shape
    groups = 8 if qw.format == "q8g32" else 4  # q8g32: t (4 codes of a column each); 4-bit: p (8 codes)
    if rows is None:
        c = qw.codes.view(panels, blocks, groups, PANEL, 4).permute(0, 3, 1, 2, 4)  # [panel, column, block, ., j]
    else:
        # One gather of only those rows' bytes (torch's multi-dimensional indexing is ~5x slower here).
        arange = functools.partial(torch.arange, device=qw.device)
        within = arange(blocks)[:, None, None] * size + arange(groups)[:, None] * 32 + arange(4)  # [block, ., j]
        start = rows // PANEL * (blocks * size) + rows % PANEL * 4
        c = qw.codes.view(-1).take(start[:, None, None, None] + within)  # [row, block, t or p, j]
    c = c.reshape(-1, blocks, groups, 1, 4).to(torch.int16)
    if qw.format != "q8g32":
        c = torch.cat([c & 0x0F, c >> 4], dim=3)  # [row, block, p, h, j]: k = 8p + 4h + j
    return c.reshape(c.shape[0], blocks * GROUP)


def _per_row(t: torch.Tensor, rows: torch.Tensor | None = None, half: int = 0) -> torch.Tensor:
    """[N/8, B, 8] -> float32 [padded N or len(rows), B]; of q4k's supers [N/8, B, 16], half 0 (D) or 1 (Dm)."""
    blocks, width = t.shape[1], t.shape[2]
    if rows is None:
        return t[..., half * PANEL : (half + 1) * PANEL].transpose(1, 2).reshape(-1, blocks).float()
    start = rows // PANEL * (blocks * width) + half * PANEL + rows % PANEL
    return t.reshape(-1).take(start[:, None] + torch.arange(blocks, device=t.device) * width).float()


def block_scales(qw: QuantizedWeight, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(d, m), float32 [len(rows) or padded N, padded K / 32] each (m None for q8g32): w = d * q (+ m) in each
    block. q4k's are computed as ggml computes them: d = D * s and m = -(Dm * t), each one float32 product."""
    if qw.format != "q4k":
        return _per_row(qw.scales, rows), None if qw.mins is None else _per_row(qw.mins, rows)
    per_super = SUPER // GROUP
    big_d = _per_row(qw.supers, rows, 0).repeat_interleave(per_super, dim=1)
    big_m = _per_row(qw.supers, rows, 1).repeat_interleave(per_super, dim=1)
    return big_d * _per_row(qw.scales, rows), -(big_m * _per_row(qw.mins, rows))


def _dequantize_rows(qw: QuantizedWeight, rows: torch.Tensor | None) -> torch.Tensor:
    """float32 [len(rows), K] (or [N, K] for all rows): d * q (+ m) per 32-weight block."""
    n, k = qw.shape
    q = _unpack_codes(qw, rows).float()
    q = q.view(q.shape[0], -1, GROUP)  # [rows, blocks, 32]
    d, m = block_scales(qw, rows)
    w = q * d[..., None]
    if m is not None:
        w = w + m[..., None]
    w = w.flatten(1)[:, :k]
    return w if rows is not None else w[:n]


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """The float32 [N, K] weight (the torch twin of every kernel here): d * q, or d * q + m, in float32."""
    return _dequantize_rows(qw, None)


# ---- making quantized weights ---------------------------------------------------------------------------------


def _fp16_scales(t: torch.Tensor, what: str) -> torch.Tensor:
    """float32 scales or mins, one per block -> rounded to float16 (as float32). A NaN or inf among a block's
    weights shows here (amax and amin propagate it), on 1/32 of the data."""
    if not torch.isfinite(t).all():
        raise ValueError("the weight holds inf or NaN: it cannot be kept quantized")
    h = t.to(torch.float16)
    if not torch.isfinite(h).all():
        raise ValueError(f"weights too large for float16 {what} (|w| up to {t.abs().max().item():.3g})")
    return h.float()


def _fp16_up(t: torch.Tensor, what: str) -> torch.Tensor:
    """As _fp16_scales, but rounded up: 63 steps of the result reach t * 63 (q4k's s and t stay under 64)."""
    h = _fp16_scales(t, what).to(torch.float16)
    h = torch.where(h.float() < t, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return _fp16_scales(h.float(), what)


def _q8_codes(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """blocks: float32 [..., 32] -> (int8 codes [..., 32], d [...]) by round-to-nearest, d = amax / 127."""
    d = _fp16_scales(blocks.abs().amax(-1) / 127, "scales")
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round(blocks * inv[..., None]).clamp_(-127, 127)
    return q.to(torch.int8), d


def _q4_codes(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """blocks: float32 [..., 32] -> (codes 0..15, d, m) with m = min and d = (max - min) / 15, round-to-nearest."""
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    d = _fp16_scales((hi - lo) / 15, "scales")
    m = _fp16_scales(lo, "mins")
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round((blocks - m[..., None]) * inv[..., None]).clamp_(0, 15)
    return q.to(torch.uint8), d, m


def _q4k_codes(blocks: torch.Tensor):
    """blocks: float32 [n, S, 8, 32] (S super-blocks of 8 blocks) -> (codes 0..15 [n, S, 8, 32], s, t [n, S, 8],
    D, Dm [n, S]). Q4_K's grid needs m <= 0, so each block's range is widened to take in 0. t is rounded up
    (m = -Dm * t at or under the block's least weight), then s (d = D * s covers the rest of the range in 15
    steps): every weight is in range, within half a step d of its code."""
    lo = blocks.amin(-1).clamp(max=0)  # [n, S, 8]
    hi = blocks.amax(-1).clamp(min=0)
    big_m = _fp16_up(-lo.amin(-1) / 63, "mins")  # [n, S]
    inv_m = torch.where(big_m > 0, 1 / big_m, torch.zeros_like(big_m))
    t = torch.ceil(-lo * inv_m[..., None]).clamp_(0, 63)
    m = -(big_m[..., None] * t)
    need = (hi - m) / 15  # the step that reaches the block's largest weight from m
    big_d = _fp16_up(need.amax(-1) / 63, "scales")
    inv_d = torch.where(big_d > 0, 1 / big_d, torch.zeros_like(big_d))
    s = torch.ceil(need * inv_d[..., None]).clamp_(0, 63)
    d = big_d[..., None] * s
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round((blocks - m[..., None]) * inv[..., None]).clamp_(0, 15)
    return q.to(torch.uint8), s, t, big_d, big_m


def _quantize_rows(w: torch.Tensor, fmt: str) -> QuantizedWeight:
    """float32 [rows, K] on the CPU -> QuantizedWeight, round-to-nearest per 32."""
    n, k = w.shape
    if padded_k(fmt, k) != k:
        w = torch.nn.functional.pad(w, (0, padded_k(fmt, k) - k))  # zero weights, never multiplied by x
    blocks = w.view(n, -1, GROUP)
    if fmt == "q8g32":
        q, d = _q8_codes(blocks)
        return _pack(fmt, (n, k), q.view(n, -1), d, None)
    if fmt == "q4k":
        q, s, t, big_d, big_m = _q4k_codes(w.view(n, -1, SUPER // GROUP, GROUP))
        return _pack(fmt, (n, k), q.view(n, -1), s.view(n, -1), t.view(n, -1), (big_d, big_m))
    q, d, m = _q4_codes(blocks)
    return _pack(fmt, (n, k), q.view(n, -1), d, m)


def _by_rows(fmt: str, shape: tuple[int, int], make) -> QuantizedWeight:
    """make(r0, r1) -> QuantizedWeight of rows r0..r1, a few thousand rows at a time, so that the float
    temporaries stay small for a vocab-sized matrix (a 128k x 2048 head is 1 GB in float32); joined by panels."""
    n = shape[0]
    parts = [make(r0, min(r0 + _ROWS_PER_PASS, n)) for r0 in range(0, max(n, 1), _ROWS_PER_PASS)]
    return parts[0] if len(parts) == 1 else _cat_panels(fmt, shape, parts)


def quantize(w: torch.Tensor, fmt: str) -> QuantizedWeight:
    """A float [N, K] weight quantized per 32 weights of a row, round-to-nearest: q8g32 with d = amax/127,
    q4g32 with m = min, d = (max - min)/15 (llama.cpp's Q8_0 and Q4_1), q4k as _q4k_codes says. K needn't be a
    multiple of 32. The result is on the CPU (QuantizedWeight.to moves it)."""
    _check_format(fmt)
    if w.dim() != 2:
        raise ValueError(f"a weight to quantize must be [out_features, in_features], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"a weight to quantize must be floating point, got {w.dtype}")
    w = w.detach()
    return _by_rows(fmt, tuple(w.shape), lambda r0, r1: _quantize_rows(w[r0:r1].to("cpu", torch.float32), fmt))


def from_gguf_blocks(raw, ggml_type: int, shape: tuple[int, int]) -> QuantizedWeight:
    """A GGUF tensor's raw blocks -> QuantizedWeight. shape is (N, K) = (out_features, in_features), K the
    innermost dimension (GGUF's ne[0]); raw the N * K / block_weights * block_bytes bytes (numpy array, bytes or
    uint8 tensor). Q4_K -> q4k, Q4_0, Q4_1 -> q4g32 (Q4_0's m = -8d), Q8_0, Q5_0 -> q8g32: exactly, the codes
    copied; Q5_1, Q5_K, Q6_K -> q8g32 requantized."""
    ggml_type = int(ggml_type)
    if ggml_type not in GGUF_TYPES:
        kept = ", ".join(t[0] for t in GGUF_TYPES.values())
        raise ValueError(f"GGUF type {ggml_type} cannot be kept quantized (supported: {kept})")
    name, per_block, block_bytes, fmt = GGUF_TYPES[ggml_type]
    n, k = shape
    if k % per_block:
        raise ValueError(f"{name} needs rows of a multiple of {per_block} weights, got {k}")
    b = gguf_blocks.as_bytes(raw)
    if b.numel() != n * k // per_block * block_bytes:
        raise ValueError(f"{name} [{n}, {k}] takes {n * k // per_block * block_bytes} bytes, got {b.numel()}")
    b = b.view(n, -1)  # [N, bytes of a row]

    def part(r0: int, r1: int) -> QuantizedWeight:
        rows = r1 - r0
        if name == "Q4_K":  # kept as it is
            big_d, big_m, s, t, q = gguf_blocks.k_parts(b[r0:r1].reshape(-1, block_bytes))
            per_row = lambda x: x.reshape(rows, -1)  # noqa: E731
            return _pack(fmt, (rows, k), per_row(q), per_row(s), per_row(t), (per_row(big_d), per_row(big_m)))
        decoded = gguf_blocks.decode(b[r0:r1].reshape(-1, block_bytes), name)
        if isinstance(decoded, torch.Tensor):  # float weights of a grid neither format holds: requantize
            return _quantize_rows(decoded.view(rows, k), fmt)
        q, d, m = decoded
        d = _fp16_scales(d, "scales").reshape(rows, -1)
        m = None if m is None else _fp16_scales(m, "mins").reshape(rows, -1)
        return _pack(fmt, (rows, k), q.reshape(rows, k), d, m)

    return _by_rows(fmt, (n, k), part)


# ---- ops ------------------------------------------------------------------------------------------------------


@functools.cache
def _cpu_kernels():
    """The compiled module, or None (after one warning) where it cannot be built: the twin runs instead."""
    try:
        return cpu_ops.load_quant()
    except cpu_ops.KernelBuildError as e:
        logger.warning("%s; quantized matmuls fall back to the slower torch ops", e)
        return None


def cpu_kernels_available() -> bool:
    """Whether qmatmul runs the compiled kernel on the CPU (else the twin, which dequantizes at every call)."""
    return _cpu_kernels() is not None


def _check_matmul(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> None:
    # Cheap checks only (is_cuda rather than .device, ~0.1 us each): decode makes ~100 of these calls a token.
    if x.shape[-1] != qw.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the weight [{qw.shape[0]}, {qw.shape[1]}] takes {qw.shape[1]}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if x.is_cuda != qw.codes.is_cuda:
        raise ValueError(f"x is on {x.device}, the weight on {qw.device}")
    if bias is not None and bias.shape != (qw.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({qw.shape[0]},)")


def qmatmul(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N] in x's dtype. CPU: the C++ kernel (int8 activations per 32, float32
    accumulation); CUDA: the Triton kernel; elsewhere, or without a compiler, qmatmul_ref."""
    _check_matmul(x, qw, bias)
    n, k = qw.shape
    flat = x.dim() == 2
    x2 = x if flat else x.reshape(-1, k)  # x2: [M, K]
    if x.is_cuda:
        from kernels.triton_quant import triton_qmatmul

        y = triton_qmatmul(x2, qw, bias)
    else:
        ops = _cpu_kernels() if x.is_cpu else None
        if ops is None:
            return qmatmul_ref(x, qw, bias)
        same = x.dtype == torch.float32
        if bias is not None:
            bias = bias.float().contiguous()
        y = ops.qlinear((x2 if same else x2.float()).contiguous(), *qw.tensors(), n, bias)
        if not same:
            y = y.to(x.dtype)
    return y if flat else y.view(*x.shape[:-1], n)


def qmatmul_ref(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The twin: dequantize, then x @ W^T (+ bias) in float32; the result in x's dtype."""
    _check_matmul(x, qw, bias)
    y = x.float() @ dequantize(qw).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def qembedding(ids: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """Rows ids of W ([N, K], e.g. a quantized or tied embedding table), dequantized -> float32 [*ids.shape, K].
    Only the gathered rows are dequantized."""
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids must be int32 or int64, got {ids.dtype}")
    flat = ids.reshape(-1).to(qw.device, torch.int64)
    # Checked on the CPU only: on CUDA the check would read the ids back to the host, which a captured CUDA graph
    # cannot do (the engine checks every prompt token id on input, and sampled ids are in range by construction).
    if not flat.is_cuda and flat.numel() and (flat.min() < 0 or flat.max() >= qw.shape[0]):
        raise ValueError(f"ids must be in [0, {qw.shape[0]})")
    return _dequantize_rows(qw, flat).view(*ids.shape, qw.shape[1])
