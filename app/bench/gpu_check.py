"""`make gpu-check`: the GPU path at real sizes, in one run that fits in about 8 minutes, with a short table last.

1. Every Triton kernel against its torch twin in bfloat16 (and the fp8 KV cache) at model-sized shapes.
2. Decode attention's achieved memory bandwidth (KV bytes read per second) against a device-to-device copy.
3. End to end on a ~1B-parameter Llama-shaped model with random weights and W64-style prompts (64 requests,
   128 new tokens, greedy, EOS ignored): kvstudio's tok/s against transformers' `generate` in static batches of
   16 and transformers' continuous batching (`generate_batch`, where the installed version has it); greedy
   agreement with transformers, CUDA graphs on against off, and an fp8 KV cache against bfloat16.

The measuring (sizes, report, timing) is in app/bench/gpu_measure.py, part 3 in app/bench/gpu_end_to_end.py.
Each check reports instead of stopping the run, so one run on a borrowed GPU says as much as it can.
Run from the repository root: `python -m app.bench.gpu_check` (needs torch with CUDA, triton, transformers).
"""

from __future__ import annotations

import argparse
import time

import torch

from app.bench.gpu_end_to_end import check_end_to_end
from app.bench.gpu_measure import REAL, SMOKE, Report, Scale, err, rel_err, timed

# ---- 1. kernels against their twins ------------------------------------------------------------------------


def _paged_setup(
    sc: Scale, num_seqs: int, max_context: int, block_size: int, gen: torch.Generator, min_context: int = 1
):
    """Random caches and shuffled block tables for num_seqs sequences of random lengths up to max_context."""
    lens = torch.randint(min_context, max_context + 1, (num_seqs,), generator=gen)
    blocks_per = (lens + block_size - 1) // block_size
    num_blocks = int(blocks_per.sum()) + 1
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(num_seqs, int(blocks_per.max()), dtype=torch.int32)
    at = 0
    for i, n in enumerate(blocks_per.tolist()):
        tables[i, :n] = perm[at : at + n]
        at += n
    shape = (num_blocks, sc.kv_heads, block_size, sc.head_dim)
    k_cache = torch.randn(shape, generator=gen).to(sc.device, sc.dtype)
    v_cache = torch.randn(shape, generator=gen).to(sc.device, sc.dtype)
    return k_cache, v_cache, tables.to(sc.device), lens.to(torch.int32).to(sc.device)


def check_kernels(report: Report, sc: Scale) -> None:
    from kernels import attention_twins as twins
    from kernels import triton_attention as ta
    from kernels import triton_cache as tc
    from kernels import triton_norm as tn
    from kernels import triton_prefill
    from kernels import triton_rotary as tr

    gen = torch.Generator().manual_seed(0)
    dev, dt, tol = sc.device, sc.dtype, sc.tol
    H, KVH, D, BS = sc.heads, sc.kv_heads, sc.head_dim, 16
    name = str(dt).removeprefix("torch.")

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dev, dt)

    def decode(num_splits):
        k, v, tables, lens = _paged_setup(sc, sc.decode_seqs, sc.decode_context, BS, gen)
        q = randn(sc.decode_seqs, H, D)
        out = ta.paged_decode_attention(q, k, v, tables, lens, D**-0.5, None, num_splits=num_splits)
        ref = twins.paged_decode_attention_ref(q, k, v, tables, lens, D**-0.5, None)
        e = err(out, ref)
        report.add(f"decode attention {name} (splits={num_splits})", e < tol, f"max abs err {e:.2e}")

    def decode_window():
        window = sc.decode_context // 2
        k, v, tables, lens = _paged_setup(sc, sc.decode_seqs, 2 * sc.decode_context, BS, gen)
        q = randn(sc.decode_seqs, H, D)
        out = ta.paged_decode_attention(q, k, v, tables, lens, D**-0.5, window)
        ref = twins.paged_decode_attention_ref(q, k, v, tables, lens, D**-0.5, window)
        e = err(out, ref)
        report.add(f"decode attention {name}, sliding window {window}", e < tol, f"max abs err {e:.2e}")

    def prefill():
        k, v, tables, ctx = _paged_setup(sc, sc.prefill_seqs, sc.prefill_context, BS, gen, min_context=2)
        # Each sequence's new tokens are the last q_len of its context; the rest is a cached prefix.
        q_lens = (ctx.cpu() * torch.rand(sc.prefill_seqs, generator=gen)).to(torch.int32).clamp_min(1)
        cu = torch.zeros(sc.prefill_seqs + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(q_lens, 0)
        q = randn(int(cu[-1]), H, D)
        args = (q, k, v, cu.to(dev), ctx, tables, D**-0.5)
        e = err(triton_prefill.prefill_attention(*args), twins.prefill_attention_ref(*args))
        report.add(f"prefill attention {name} (varlen, cached prefixes)", e < tol, f"max abs err {e:.2e}")

    def cache_write_and_copy():
        num_blocks = 4 * sc.decode_seqs
        tokens = num_blocks * BS // 2
        for cache_dtype, label in ((dt, name), (torch.float8_e4m3fn, "fp8")):
            shape = (num_blocks, KVH, BS, D)
            kc = torch.zeros(shape, dtype=cache_dtype, device=dev)
            vc = torch.zeros_like(kc)
            kr, vr = kc.clone(), vc.clone()
            key, val = randn(tokens, KVH, D), randn(tokens, KVH, D)
            slots = torch.randperm(num_blocks * BS, generator=gen)[:tokens].to(dev)
            tc.reshape_and_cache(key, val, kc, vc, slots, 0.05, 0.05)
            tc.reshape_and_cache_ref(key, val, kr, vr, slots, 0.05, 0.05)
            same = torch.equal(kc.view(torch.uint8), kr.view(torch.uint8)) and torch.equal(
                vc.view(torch.uint8), vr.view(torch.uint8)
            )
            report.add(f"reshape_and_cache {label}", same, "bytes equal to the twin" if same else "bytes differ")
        pool = randn(2, 4, num_blocks, KVH, BS, D)
        pairs = torch.randperm(num_blocks, generator=gen)[: num_blocks // 2].view(-1, 2)  # [pairs, 2]
        ref = pool.clone()
        tc.copy_blocks_ref(ref, pairs[:, 0].to(dev), pairs[:, 1].to(dev))
        tc.copy_blocks(pool, pairs[:, 0].to(dev), pairs[:, 1].to(dev))
        report.add(f"copy_blocks (4 layers, {len(pairs)} pairs)", torch.equal(pool, ref), "equal to the twin")

    def fp8_decode():
        k, v, tables, lens = _paged_setup(sc, sc.decode_seqs, sc.decode_context, BS, gen)
        scale_k, scale_v = tc.kv_scale(k), tc.kv_scale(v)
        k8 = (k.float() / scale_k).clamp(-448, 448).to(torch.float8_e4m3fn)
        v8 = (v.float() / scale_v).clamp(-448, 448).to(torch.float8_e4m3fn)
        q = randn(sc.decode_seqs, H, D)
        out = ta.paged_decode_attention(q, k8, v8, tables, lens, D**-0.5, None, scale_k, scale_v)
        ref = twins.paged_decode_attention_ref(q, k8, v8, tables, lens, D**-0.5, None, scale_k, scale_v)
        exact = twins.paged_decode_attention_ref(q, k, v, tables, lens, D**-0.5, None)
        e, q_err = err(out, ref), err(out, exact)
        report.add(
            "decode attention, fp8 e4m3 cache",
            e < max(tol, 3e-2),
            f"max abs err vs twin {e:.2e}, vs unquantized {q_err:.2e}",
        )

    def norm_and_rotary():
        T, hidden = sc.norm_tokens, sc.hidden
        x, res = randn(T, hidden), randn(T, hidden)
        w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dev, dt)
        out, new_res = tn.rms_norm(x, w, 1e-5, res.clone())
        ref, ref_res = tn.rms_norm_ref(x, w, 1e-5, res.clone())
        e = max(rel_err(out, ref), rel_err(new_res, ref_res))
        report.add(f"rms_norm + residual {name}", e < tol, f"max rel err {e:.2e}")
        pos = torch.randint(0, 8192, (T,), generator=gen).to(dev)
        inv = 1.0 / 500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
        freqs = torch.arange(8192, dtype=torch.float32)[:, None] * inv[None, :]
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dev)
        for neox in (True, False):
            q, k = randn(T, H, D), randn(T, KVH, D)
            qr, kr = q.clone(), k.clone()
            tr.rotary_embedding(pos, q, k, cache, neox)
            tr.rotary_embedding_ref(pos, qr, kr, cache, neox)
            e = max(rel_err(q, qr), rel_err(k, kr))
            report.add(f"rotary ({'neox' if neox else 'gpt-j'}) {name}", e < tol, f"max rel err {e:.2e}")

    for check, fn in (
        ("decode attention", lambda: decode(1)),
        ("decode attention split", lambda: decode(4)),
        ("decode window", decode_window),
        ("prefill attention", prefill),
        ("cache write / copy", cache_write_and_copy),
        ("fp8 decode", fp8_decode),
        ("norm / rotary", norm_and_rotary),
    ):
        report.run(check, fn)


# ---- 2. decode attention bandwidth -------------------------------------------------------------------------


def check_bandwidth(report: Report, sc: Scale) -> None:
    from kernels import triton_attention as ta

    H, KVH, D, BS, B, ctx = sc.heads, sc.kv_heads, sc.head_dim, 16, sc.decode_seqs, sc.decode_context
    blocks = ctx // BS
    k = torch.randn(B * blocks, KVH, BS, D, device=sc.device, dtype=sc.dtype)
    v = torch.randn_like(k)
    tables = torch.arange(B * blocks, dtype=torch.int32, device=sc.device).view(B, blocks)
    lens = torch.full((B,), blocks * BS, dtype=torch.int32, device=sc.device)
    q = torch.randn(B, H, D, device=sc.device, dtype=sc.dtype)
    repeat = 20 if sc.device == "cuda" else 2
    t_attn = timed(lambda: ta.paged_decode_attention(q, k, v, tables, lens, D**-0.5, None), sc.device, repeat)
    kv_bytes = 2 * k.numel() * k.element_size()
    src = torch.empty(kv_bytes // 2, dtype=torch.uint8, device=sc.device)
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src), sc.device, repeat)
    attn_bw, copy_bw = kv_bytes / t_attn / 1e9, 2 * src.numel() / t_copy / 1e9
    ratio = attn_bw / copy_bw
    report.add(
        f"decode attention bandwidth ({B} x {blocks * BS} ctx)",
        ratio >= 0.7 if sc.device == "cuda" else None,
        f"{attn_bw:.1f} GB/s = {ratio:.0%} of copy {copy_bw:.1f} GB/s ({t_attn * 1e3:.2f} ms; goal 70%)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes on the CPU under Triton's interpreter (set TRITON_INTERPRET=1): checks "
        "the script, not the GPU",
    )
    args = parser.parse_args(argv)
    sc = SMOKE if args.smoke else REAL
    if sc.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device (--smoke runs the script on the CPU)")
        return 2
    report = Report()
    if sc.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        report.add("device", None, f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")
    start = time.perf_counter()
    check_kernels(report, sc)
    report.run("bandwidth", lambda: check_bandwidth(report, sc))
    if not args.skip_e2e:
        report.run("end to end", lambda: check_end_to_end(report, sc, args.max_tokens))
    report.add("wall time", None, f"{time.perf_counter() - start:.0f} s")
    print()
    print(report.table())
    return 0 if all(v != "FAIL" for _, v, _ in report.rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
