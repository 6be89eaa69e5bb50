"""`make gpu-check`: the GPU path at real sizes, in one run that fits in about 8 minutes, with a short table last.

1. Every Triton kernel against its torch twin in bfloat16 (and the fp8 KV cache) at model-sized shapes.
2. Decode attention's achieved memory bandwidth (KV bytes read per second) against a device-to-device copy.
3. End to end on a ~1B-parameter Llama-shaped model with random weights and W64-style prompts (64 requests,
   128 new tokens, greedy, EOS ignored): kvstudio's tok/s against transformers' `generate` in static batches of
   16 and transformers' continuous batching (`generate_batch`, where the installed version has it); greedy
   agreement with transformers, CUDA graphs on against off, and an fp8 KV cache against bfloat16.

Each check reports instead of stopping the run, so one run on a borrowed GPU says as much as it can.
Run from the repository root: `python -m app.gpu_check` (needs torch with CUDA, triton, transformers).
"""
from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

W64 = Path(__file__).resolve().parent.parent / "resources" / "bench" / "w64_prompts.jsonl"
BF16_TOL = 3e-2


@dataclass
class Report:
    rows: list[tuple[str, str, str]] = field(default_factory=list)   # (check, verdict, detail)

    def add(self, check: str, ok: bool | None, detail: str) -> None:
        verdict = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        self.rows.append((check, verdict, detail))
        print(f"[{verdict}] {check}: {detail}", flush=True)

    def run(self, check: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:   # one failing check must not hide the others' results
            traceback.print_exc()
            self.add(check, False, f"{type(e).__name__}: {e}"[:200])

    def table(self) -> str:
        width = max(len(c) for c, _, _ in self.rows)
        lines = [f"{'check':<{width}}  result  detail", "-" * (width + 40)]
        lines += [f"{c:<{width}}  {v:<6}  {d}" for c, v, d in self.rows]
        return "\n".join(lines)


def _timed(fn: Callable[[], object], repeat: int = 20) -> float:
    """Median seconds of fn on the GPU, after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---- 1. kernels against their twins ------------------------------------------------------------------------

def _paged_setup(num_seqs: int, max_context: int, kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, gen: torch.Generator):
    """Random caches and shuffled block tables for num_seqs sequences of random lengths up to max_context."""
    lens = torch.randint(1, max_context + 1, (num_seqs,), generator=gen)
    blocks_per = (lens + block_size - 1) // block_size
    num_blocks = int(blocks_per.sum()) + 1
    perm = torch.randperm(num_blocks, generator=gen)
    width = int(blocks_per.max())
    tables = torch.zeros(num_seqs, width, dtype=torch.int32)
    at = 0
    for i, n in enumerate(blocks_per.tolist()):
        tables[i, :n] = perm[at:at + n]
        at += n
    shape = (num_blocks, kv_heads, block_size, head_dim)
    k_cache = torch.randn(shape, generator=gen).to("cuda", dtype)
    v_cache = torch.randn(shape, generator=gen).to("cuda", dtype)
    return k_cache, v_cache, tables.cuda(), lens.to(torch.int32).cuda()


def check_kernels(report: Report) -> None:
    from kernels import triton_attention as ta
    from kernels import triton_cache as tc
    from kernels import triton_norm as tn
    from kernels import triton_rotary as tr

    gen = torch.Generator().manual_seed(0)
    dt = torch.bfloat16
    H, KVH, D, BS = 32, 8, 128, 16

    def decode(num_splits):
        k, v, tables, lens = _paged_setup(64, 4096, KVH, D, BS, dt, gen)
        q = torch.randn(64, H, D, generator=gen).to("cuda", dt)
        out = ta.paged_decode_attention(q, k, v, tables, lens, D ** -0.5, None, num_splits=num_splits)
        ref = ta.paged_decode_attention_ref(q, k, v, tables, lens, D ** -0.5, None)
        e = _err(out, ref)
        report.add(f"decode attention bf16 (splits={num_splits})", e < BF16_TOL, f"max abs err {e:.2e}")

    def decode_window():
        k, v, tables, lens = _paged_setup(16, 8192, KVH, D, BS, dt, gen)
        q = torch.randn(16, H, D, generator=gen).to("cuda", dt)
        out = ta.paged_decode_attention(q, k, v, tables, lens, D ** -0.5, 4096)
        ref = ta.paged_decode_attention_ref(q, k, v, tables, lens, D ** -0.5, 4096)
        e = _err(out, ref)
        report.add("decode attention bf16, sliding window 4096", e < BF16_TOL, f"max abs err {e:.2e}")

    def prefill():
        k, v, tables, ctx = _paged_setup(8, 2048, KVH, D, BS, dt, gen)
        q_lens = torch.minimum(ctx.cpu(), torch.randint(1, 1025, (8,), generator=gen).to(torch.int32))
        cu = torch.zeros(9, dtype=torch.int32)
        cu[1:] = torch.cumsum(q_lens, 0)
        q = torch.randn(int(cu[-1]), H, D, generator=gen).to("cuda", dt)
        args = (q, k, v, cu.cuda(), ctx, tables, D ** -0.5)
        e = _err(ta.prefill_attention(*args), ta.prefill_attention_ref(*args))
        report.add("prefill attention bf16 (varlen, cached prefixes)", e < BF16_TOL, f"max abs err {e:.2e}")

    def cache_write_and_copy():
        for cache_dtype, name in ((dt, "bf16"), (torch.float8_e4m3fn, "fp8")):
            shape = (512, KVH, BS, D)
            kc, vc = torch.zeros(shape, dtype=cache_dtype, device="cuda"), torch.zeros(shape, dtype=cache_dtype,
                                                                                         device="cuda")
            kr, vr = kc.clone(), vc.clone()
            key = torch.randn(3000, KVH, D, generator=gen).to("cuda", dt)
            val = torch.randn(3000, KVH, D, generator=gen).to("cuda", dt)
            slots = torch.randperm(512 * BS, generator=gen)[:3000].cuda()
            tc.reshape_and_cache(key, val, kc, vc, slots, 0.05, 0.05)
            tc.reshape_and_cache_ref(key, val, kr, vr, slots, 0.05, 0.05)
            same = torch.equal(kc.view(torch.uint8), kr.view(torch.uint8)) and \
                torch.equal(vc.view(torch.uint8), vr.view(torch.uint8))
            report.add(f"reshape_and_cache {name}", same, "bytes equal to the twin" if same else "bytes differ")
        pool = torch.randn(2, 24, 256, KVH, BS, D, generator=gen).to("cuda", dt)
        src, dst = torch.randperm(256, generator=gen)[:64].cuda(), torch.randperm(256, generator=gen)[:64].cuda()
        ref = pool.clone()
        tc.copy_blocks_ref(ref, src, dst)
        tc.copy_blocks(pool, src, dst)
        report.add("copy_blocks (24 layers, 64 pairs)", torch.equal(pool, ref), "equal to the twin")

    def fp8_decode():
        k, v, tables, lens = _paged_setup(32, 2048, KVH, D, BS, dt, gen)
        scale_k, scale_v = tc.kv_scale(k), tc.kv_scale(v)
        k8 = (k.float() / scale_k).clamp(-448, 448).to(torch.float8_e4m3fn)
        v8 = (v.float() / scale_v).clamp(-448, 448).to(torch.float8_e4m3fn)
        q = torch.randn(32, H, D, generator=gen).to("cuda", dt)
        out = ta.paged_decode_attention(q, k8, v8, tables, lens, D ** -0.5, None, scale_k, scale_v)
        ref = ta.paged_decode_attention_ref(q, k8, v8, tables, lens, D ** -0.5, None, scale_k, scale_v)
        exact = ta.paged_decode_attention_ref(q, k, v, tables, lens, D ** -0.5, None)
        e, q_err = _err(out, ref), _err(out, exact)
        report.add("decode attention, fp8 e4m3 cache", e < BF16_TOL,
                   f"max abs err vs twin {e:.2e}, vs unquantized {q_err:.2e}")

    def norm_and_rotary():
        x = torch.randn(4096, 4096, generator=gen).to("cuda", dt)
        res = torch.randn(4096, 4096, generator=gen).to("cuda", dt)
        w = (1 + 0.1 * torch.randn(4096, generator=gen)).to("cuda", dt)
        out, new_res = tn.rms_norm(x, w, 1e-5, res.clone())
        ref, ref_res = tn.rms_norm_ref(x, w, 1e-5, res.clone())
        e = max(_err(out, ref), _err(new_res, ref_res))
        report.add("rms_norm + residual bf16", e < BF16_TOL, f"max abs err {e:.2e}")
        pos = torch.randint(0, 8192, (4096,), generator=gen).cuda()
        inv = 1.0 / 500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
        freqs = torch.arange(8192, dtype=torch.float32)[:, None] * inv[None, :]
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1).cuda()
        for neox in (True, False):
            q = torch.randn(4096, H, D, generator=gen).to("cuda", dt)
            k = torch.randn(4096, KVH, D, generator=gen).to("cuda", dt)
            qr, kr = q.clone(), k.clone()
            tr.rotary_embedding(pos, q, k, cache, neox)
            tr.rotary_embedding_ref(pos, qr, kr, cache, neox)
            e = max(_err(q, qr), _err(k, kr))
            report.add(f"rotary ({'neox' if neox else 'gpt-j'}) bf16", e < BF16_TOL, f"max abs err {e:.2e}")

    for name, fn in (("decode attention", lambda: decode(1)), ("decode attention split", lambda: decode(8)),
                     ("decode window", decode_window), ("prefill attention", prefill),
                     ("cache write / copy", cache_write_and_copy), ("fp8 decode", fp8_decode),
                     ("norm / rotary", norm_and_rotary)):
        report.run(name, fn)


# ---- 2. decode attention bandwidth -------------------------------------------------------------------------

def check_bandwidth(report: Report) -> None:
    from kernels import triton_attention as ta

    H, KVH, D, BS, B, ctx = 32, 8, 128, 16, 64, 4096
    blocks = ctx // BS
    k = torch.randn(B * blocks, KVH, BS, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    tables = torch.arange(B * blocks, dtype=torch.int32, device="cuda").view(B, blocks)
    lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16)
    t_attn = _timed(lambda: ta.paged_decode_attention(q, k, v, tables, lens, D ** -0.5, None))
    kv_bytes = 2 * k.numel() * k.element_size()
    src = torch.empty(kv_bytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t_copy = _timed(lambda: dst.copy_(src))
    attn_bw, copy_bw = kv_bytes / t_attn / 1e9, 2 * src.numel() / t_copy / 1e9
    ratio = attn_bw / copy_bw
    report.add("decode attention bandwidth (64 x 4096 ctx, bf16)", ratio >= 0.7,
               f"{attn_bw:.0f} GB/s = {ratio:.0%} of copy {copy_bw:.0f} GB/s ({t_attn * 1e3:.2f} ms; goal 70%)")


# ---- 3. end to end --------------------------------------------------------------------------------------------

def _w64_texts() -> list[str]:
    rows = [json.loads(line) for line in W64.read_text().splitlines() if line.strip()]
    return ["\n".join(m["content"] for m in row["messages"]) for row in rows]


def _build_model(directory: Path, texts: list[str]):
    """A random Llama of ~1.1B parameters (Llama-3.2-1B's shape, smaller vocabulary) with a BPE tokenizer trained
    on the prompts, saved as safetensors like a downloaded model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                         rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1,
                         tie_word_embeddings=False, initializer_range=0.02)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


def _kvstudio(path: Path, prompts: list[list[int]], max_tokens: int, **options) -> tuple[list[list[int]], float]:
    from engine import LLM, SamplingParams

    llm = LLM(str(path), dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.45, **options)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:4]], params, use_tqdm=False)   # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outs], seconds


def _hf_static(model, prompts: list[list[int]], max_tokens: int, pad: int) -> tuple[list[list[int]], float]:
    out_tokens = []
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(prompts), 16):
            batch = prompts[first:first + 16]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, p in enumerate(batch):
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            out = model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), do_sample=False,
                                 max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=pad)
            out_tokens += out[:, width:].tolist()
    torch.cuda.synchronize()
    return out_tokens, time.perf_counter() - start


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions where two greedy runs agree, counting each sequence up to its first divergence."""
    same = total = 0
    for x, y in zip(a, b):
        n = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), len(x))
        same += n
        total += len(x)
    return same / total


def check_end_to_end(report: Report, max_tokens: int) -> None:
    texts = _w64_texts()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        model, tokenizer = _build_model(directory, texts)
        prompts = [tokenizer.encode(t)[:1000 - max_tokens] for t in texts]
        n_params = sum(p.numel() for p in model.parameters()) / 1e9
        report.add("e2e model", None, f"random Llama {n_params:.2f}B params, bf16, {len(prompts)} prompts of "
                                      f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, {max_tokens} new")
        generated = len(prompts) * max_tokens

        ours, t_ours = _kvstudio(directory, prompts, max_tokens)
        hf_tokens, t_hf = _hf_static(model, prompts, max_tokens, pad=1)
        report.add("kvstudio tok/s", None, f"{generated / t_ours:.0f} tok/s ({t_ours:.2f} s)")
        report.add("hf generate tok/s (static batches of 16)", None, f"{generated / t_hf:.0f} tok/s "
                   f"({t_hf:.2f} s) -> kvstudio {t_hf / t_ours:.1f}x (goal 10x)")
        agree = _agreement(ours, hf_tokens)
        report.add("greedy agreement with transformers (bf16)", agree > 0.5, f"{agree:.1%} of tokens before the "
                   "first divergence (bf16 kernels differ in rounding, so some divergence is expected)")

        def hf_continuous(model=model):
            from transformers import GenerationConfig

            if not hasattr(model, "generate_batch"):
                report.add("hf generate_batch tok/s", None, "not in this transformers version")
                return
            cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1, pad_token_id=1)
            torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate_batch(inputs=prompts, generation_config=cfg)
            torch.cuda.synchronize()
            t = time.perf_counter() - start
            report.add("hf generate_batch tok/s (continuous batching)", None,
                       f"{generated / t:.0f} tok/s ({t:.2f} s) -> kvstudio {t / t_ours:.1f}x")

        report.run("hf generate_batch", hf_continuous)
        del model
        gc.collect()
        torch.cuda.empty_cache()

        def eager():
            tokens, t = _kvstudio(directory, prompts, max_tokens, cuda_graphs=False)
            report.add("CUDA graphs on vs off", tokens == ours,
                       f"tokens {'identical' if tokens == ours else 'differ'}; eager {generated / t:.0f} tok/s")

        def fp8():
            tokens, t = _kvstudio(directory, prompts, max_tokens, kv_cache_dtype="fp8")
            agree = _agreement(tokens, ours)
            report.add("fp8 KV cache vs bf16 (W64 greedy)", agree > 0.5,
                       f"{agree:.1%} token agreement; {generated / t:.0f} tok/s")

        report.run("CUDA graphs", eager)
        report.run("fp8 KV", fp8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--skip-e2e", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device")
        return 2
    report = Report()
    props = torch.cuda.get_device_properties(0)
    report.add("device", None, f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")
    start = time.perf_counter()
    check_kernels(report)
    report.run("bandwidth", lambda: check_bandwidth(report))
    if not args.skip_e2e:
        report.run("end to end", lambda: check_end_to_end(report, args.max_tokens))
    report.add("wall time", None, f"{time.perf_counter() - start:.0f} s")
    print()
    print(report.table())
    return 0 if all(v != "FAIL" for _, v, _ in report.rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
