"""Single-stream latency: what a person chatting feels. One prompt, greedy, EOS ignored: time to first token for a
short chat prompt (or a code edit) and for a long one, decode tokens per second, and resident memory.

Each engine runs in a child process of its own (`python -m app.bench.latency --child ENGINE ...`), so its
resident memory is its own and nothing one engine allocated slows the other; the parent alternates the engines
`repeat` times and reports medians. The baseline, llama.cpp through llama-cpp-python (what LM Studio, Ollama,
GPT4All and Jan run on), reads the same GGUF file with the same number of threads. llama-cpp-python is an
optional extra built from source (`make baseline`); `--baseline-python` points at another interpreter that has
it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

ENGINES = ("kvstudio", "llama.cpp")
SYSTEM = "You are a helpful AI assistant."
SHORT_USER = (
    "Explain in a few paragraphs how a key-value cache speeds up autoregressive text generation in transformer "
    "language models."
)
# What an IDE plugin asks of a model all day: write back code that is in the prompt with one change. Prompt lookup
# (speculative decoding method "ngram") finds its drafts in the prompt.
CODE_EDIT_USER = (
    "Here is a Python function:\n\n```python\n"
    "def summarize(orders, tax_rate):\n"
    "    total = 0.0\n"
    "    count = 0\n"
    "    largest = None\n"
    "    for order in orders:\n"
    "        if order.cancelled:\n"
    "            continue\n"
    "        amount = order.price * order.quantity\n"
    "        total += amount\n"
    "        count += 1\n"
    "        if largest is None or amount > largest:\n"
    "            largest = amount\n"
    "    average = total / count if count else 0.0\n"
    "    return {\n"
    "        'total': total * (1 + tax_rate),\n"
    "        'count': count,\n"
    "        'average': average,\n"
    "        'largest': largest,\n"
    "    }\n"
    "```\n\n"
    "Write the whole function again with one change: rename the variable `total` to `running_total`. "
    "Reply with the code only."
)
WORKLOADS = {"chat": SHORT_USER, "code-edit": CODE_EDIT_USER}
# Repeated, then cut to the long prompt's token count: prose, so tokenizers cut it into similar numbers of tokens.
LONG_TEXT = (
    "The history of computing is a long story of abstraction layered upon abstraction. Early machines were "
    "programmed by rewiring panels, then by punching cards, then by writing assembly language, and eventually "
    "by writing in high level languages that compilers translate into machine code. Each layer hides details of "
    "the layer beneath it while adding new concepts that make programmers more productive. "
)


@dataclass(frozen=True)
class LatencyResult:
    engine: str
    load_s: float
    short_prompt_tokens: int
    ttft_s: float  # short prompt: prefill and the first token
    decode_tok_s: float  # the tokens after the first, per second
    long_prompt_tokens: int
    long_ttft_s: float
    rss_mib: float  # resident memory after the runs
    peak_rss_mib: float  # the process's high-water mark


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


# ---- children: one engine each -----------------------------------------------------------------------------


def chat_text(model: str, workload: str = "chat") -> str:
    """The workload's prompt through the model's chat template (the tokenizer alone is loaded, not the weights):
    both engines are given this text."""
    from engine import render_chat
    from engine.models.loader import open_model

    tok = open_model(model).tokenizer
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": WORKLOADS[workload]}]
    return render_chat(tok, messages)["prompt"]


def _kvstudio_child(
    model: str, threads: int, max_tokens: int, long_tokens: int, options: dict, chat_text: str
) -> LatencyResult:
    """chat_text: the chat prompt as the template renders it (special tokens written in it)."""
    import torch

    from engine import LLM, SamplingParams

    torch.set_num_threads(threads)
    start = time.perf_counter()
    llm = LLM(model, **options)
    load_s = time.perf_counter() - start
    engine, tok = llm.llm_engine, llm.get_tokenizer()
    short_ids = tok.encode(chat_text, add_special_tokens=False)
    long_ids = tok.encode(LONG_TEXT * (long_tokens // 40 + 1), add_special_tokens=False)[:long_tokens]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    first_prompt = {"prompt_token_ids": short_ids}

    def run(prompt: dict, n: int, rid: str) -> tuple[float, float]:
        """(time to the first token, decode tokens per second after it)."""
        engine.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
        t0 = time.perf_counter()
        t_first = t_last = None
        produced = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                produced = len(out.outputs[0].token_ids)
                now = time.perf_counter()
                if t_first is None and produced:
                    t_first = now
                t_last = now
        rate = (produced - 1) / (t_last - t_first) if produced > 1 else 0.0
        return t_first - t0, rate

    # First calls allocate and pick kernels (a chat starts after the load too); on text of its own, so the prefix
    # cache holds nothing of the measured prompts.
    run({"prompt_token_ids": tok.encode("Warm up: count from one to ten.")}, 4, "warm-up")
    ttft, rate = run(first_prompt, params.max_tokens, "short")
    # The long prompt is new text: the prefix cache holds nothing of it.
    long_ttft, _ = run({"prompt_token_ids": long_ids}, 1, "long")
    return LatencyResult(
        "kvstudio",
        load_s,
        len(short_ids),
        ttft,
        rate,
        len(long_ids),
        long_ttft,
        _status_mib("VmRSS"),
        _status_mib("VmHWM"),
    )


def _llama_cpp_child(model: str, threads: int, max_tokens: int, long_tokens: int, chat_text: str) -> LatencyResult:
    """chat_text: the chat prompt as kvstudio's template renders it, tokenized here by llama.cpp's tokenizer."""
    import llama_cpp

    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=4096, verbose=False)
    load_s = time.perf_counter() - start
    short_ids = llm.tokenize(chat_text.encode(), add_bos=False, special=True)
    long_ids = llm.tokenize((LONG_TEXT * (long_tokens // 40 + 1)).encode(), add_bos=False)[:long_tokens]

    def run(ids: list[int], n: int) -> tuple[float, float]:
        llm.reset()  # nothing of the previous prompt is reused
        t0 = time.perf_counter()
        t_first = None
        produced = 0
        # The library's own greedy loop; it never stops on EOS by itself (create_completion does that).
        for _ in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
            produced += 1
            if t_first is None:
                t_first = time.perf_counter()
            if produced >= n:
                break
        t_last = time.perf_counter()
        return t_first - t0, (produced - 1) / (t_last - t_first) if produced > 1 else 0.0

    run(short_ids, 4)
    ttft, rate = run(short_ids, max_tokens)
    long_ttft, _ = run(long_ids, 1)
    return LatencyResult(
        "llama.cpp",
        load_s,
        len(short_ids),
        ttft,
        rate,
        len(long_ids),
        long_ttft,
        _status_mib("VmRSS"),
        _status_mib("VmHWM"),
    )


# ---- the parent --------------------------------------------------------------------------------------------


def run_child(
    engine: str,
    model: str,
    threads: int,
    max_tokens: int,
    long_tokens: int,
    python: str,
    options: dict | None = None,
    chat: str = "",
) -> LatencyResult:
    """Run one engine in a fresh process; raises RuntimeError with its stderr when it fails."""
    cmd = [
        python,
        "-m",
        "app.bench.latency",
        "--child",
        engine,
        "--model",
        model,
        "--threads",
        str(threads),
        "--max-tokens",
        str(max_tokens),
        "--long-tokens",
        str(long_tokens),
        "--options",
        json.dumps(options or {}),
        "--chat-text",
        chat,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    # The child imports app/ from this checkout or install, whatever interpreter runs it.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the {engine} run failed:\n{proc.stderr.strip()[-2000:]}")
    return LatencyResult(**json.loads(proc.stdout.strip().splitlines()[-1]))


def median_result(results: list[LatencyResult]) -> LatencyResult:
    fields = asdict(results[0])
    return LatencyResult(
        engine=results[0].engine,
        **{k: statistics.median(getattr(r, k) for r in results) for k in fields if k != "engine"},
    )


def format_table(results: list[LatencyResult]) -> str:
    rows = [
        ("engine", lambda r: r.engine),
        ("load s", lambda r: f"{r.load_s:.2f}"),
        ("TTFT s (chat prompt)", lambda r: f"{r.ttft_s:.3f} ({r.short_prompt_tokens:.0f} tok)"),
        ("decode tok/s", lambda r: f"{r.decode_tok_s:.1f}"),
        ("TTFT s (long prompt)", lambda r: f"{r.long_ttft_s:.2f} ({r.long_prompt_tokens:.0f} tok)"),
        ("resident MiB", lambda r: f"{r.rss_mib:.0f}"),
        ("peak resident MiB", lambda r: f"{r.peak_rss_mib:.0f}"),
    ]
    lines = []
    for label, cell in rows:
        lines.append(f"{label:<22}" + "".join(f"{cell(r):>22}" for r in results))
    if len(results) == 2:
        a, b = results
        lines.append(
            f"{'kvstudio / llama.cpp':<22}decode {a.decode_tok_s / b.decode_tok_s:.2f}x, "
            f"long TTFT {b.long_ttft_s / a.long_ttft_s:.2f}x (>1: kvstudio faster), "
            f"resident {a.rss_mib / b.rss_mib:.2f}x"
        )
    return "\n".join(lines)


def _child_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=ENGINES, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--long-tokens", type=int, required=True)
    parser.add_argument("--options", default="{}")
    parser.add_argument("--chat-text", default="")
    args = parser.parse_args(argv)
    if args.child == "kvstudio":
        options = json.loads(args.options)
        result = _kvstudio_child(args.model, args.threads, args.max_tokens, args.long_tokens, options, args.chat_text)
    else:
        result = _llama_cpp_child(args.model, args.threads, args.max_tokens, args.long_tokens, args.chat_text)
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
