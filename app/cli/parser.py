"""The kvstudio command line's grammar: every command, its options and their help (app/cli/main.py runs them)."""

from __future__ import annotations

import argparse
from pathlib import Path

from app.cli import options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvstudio",
        description="kvstudio: a paged-KV-cache LLM engine for one workstation. With no command it starts a "
        "chat in the terminal on the default model.",
    )
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    engine_options, sampling_options = options.engine_options(), options.sampling_options()

    generate = commands.add_parser(
        "generate",
        parents=[engine_options, sampling_options],
        help="stream a completion, or chat",
        description="Stream the model's reply to PROMPT. Without PROMPT, reads it from stdin, or, when stdin "
        "is a terminal, starts an interactive chat.",
    )
    generate.add_argument("prompt", nargs="?", help="the prompt (default: stdin, or an interactive chat)")

    serve = commands.add_parser(
        "serve",
        parents=[engine_options],
        help="the OpenAI-compatible HTTP endpoint",
        description="Serve the model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
        "/v1/models, /tokenize, /detokenize, /metrics, /health). Binds 127.0.0.1 unless told "
        "otherwise; SIGTERM or Ctrl-C drains in-flight requests, then exits.",
    )
    serve.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="the model id clients use (default: a .gguf file's name without .gguf, the Hub repo id, or the "
        "model folder's name)",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it to the network)"
    )
    serve.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free port")
    serve.add_argument("--api-key", metavar="KEY", help="require Authorization: Bearer KEY on every route but /health")
    serve.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser requests from this origin (repeatable; default: none)",
    )
    serve.add_argument(
        "--max-queue",
        type=options.positive_int,
        metavar="N",
        help="unfinished requests beyond which new ones get 503 + Retry-After (default: no limit)",
    )
    serve.add_argument(
        "--drain-timeout",
        type=options.non_negative_float,
        default=30.0,
        metavar="S",
        help="seconds in-flight requests get to finish on shutdown (default 30)",
    )

    bench = commands.add_parser("bench", help="benchmarks")
    bench_commands = bench.add_subparsers(dest="bench_command", title="benchmarks", metavar="BENCHMARK", required=True)
    throughput = bench_commands.add_parser(
        "throughput",
        parents=[engine_options],
        help="generated tokens per second on a chat workload",
        description="Greedy, EOS ignored, exactly max_tokens new tokens per request, chat template applied; "
        "reports generated tokens / wall seconds, model load excluded.",
    )
    throughput.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE.jsonl",
        help='one {"messages": [...], "max_tokens": N} per line (default: the built-in '
        "W64 workload, 64 requests x 128 tokens)",
    )
    throughput.add_argument("--num-prompts", type=options.positive_int, metavar="N", help="use the first N requests")
    throughput.add_argument(
        "--max-tokens", type=options.positive_int, metavar="N", help="new tokens per request, in place of the file's"
    )
    throughput.add_argument(
        "--baseline", choices=["hf"], help="also run transformers' generate on the same weights and prompts"
    )
    throughput.add_argument(
        "--json-schema",
        type=Path,
        metavar="FILE.json",
        help="also run the workload with every reply kept to this JSON schema (structured outputs) and report the "
        "constrained rate beside the free one (example: resources/bench/w64_schema.json)",
    )
    serving = bench_commands.add_parser(
        "serve",
        parents=[engine_options],
        help="latency and throughput of the HTTP endpoint",
        description="W64's chat requests streamed against an OpenAI-compatible endpoint at each concurrency "
        "level: time to first token and inter-token latency (p50/p90/p99) and output tokens per "
        "second. Without --url it starts kvstudio's own endpoint on a free port first.",
    )
    serving.add_argument("--url", help="a running endpoint's base URL, e.g. http://127.0.0.1:8000/v1")
    serving.add_argument("--api-key", metavar="KEY")
    serving.add_argument(
        "--served-model-name", metavar="NAME", help="the model id to ask for (default: the endpoint's first model)"
    )
    serving.add_argument(
        "--concurrency",
        type=options.positive_int,
        nargs="+",
        default=[1, 8, 32],
        metavar="N",
        help="client counts to run, one level each (default: 1 8 32)",
    )
    serving.add_argument("--prompts", type=Path, metavar="FILE.jsonl", help="default: the built-in W64 workload")
    serving.add_argument("--num-prompts", type=options.positive_int, metavar="N", help="use the first N requests")
    serving.add_argument(
        "--max-tokens", type=options.positive_int, metavar="N", help="new tokens per request, in place of the file's"
    )
    storm = bench_commands.add_parser(
        "cancel-storm",
        parents=[engine_options],
        help="what IDE plugins do to the endpoint: requests dropped mid-flight; checks that nothing is left behind",
        description="Starts kvstudio's endpoint on a free port, then several clients fire streamed code "
        "completions, most dropped 0-400 ms after sending, some before any byte of the answer, and a few chat "
        "requests read to the end. Then it checks that the server answers, that no request is left running and "
        "no KV block held, and reports the tokens generated that no client received and the time to first "
        "token of the requests that finished. Exit status 0 when every check holds, 1 when one does not.",
    )
    storm.add_argument(
        "--requests", type=options.positive_int, default=300, metavar="N", help="requests in all (default: 300)"
    )
    storm.add_argument(
        "--clients", type=options.positive_int, default=8, metavar="N", help="concurrent clients (default: 8)"
    )
    storm.add_argument(
        "--seed", type=int, default=0, metavar="N", help="which requests, cursors and drop times (default: 0)"
    )
    latency = bench_commands.add_parser(
        "latency",
        parents=[engine_options],
        help="one chat stream: time to first token, decode tokens/s, resident memory",
        description="One prompt at a time, greedy, EOS ignored: time to first token for a chat prompt and for a "
        "long one, decode tokens per second, resident memory. Each engine runs in a process of its own, "
        "alternating --repeat times; the table gives medians. --baseline llama.cpp runs llama-cpp-python on the "
        "same GGUF file with the same threads (`make baseline` installs it).",
    )
    latency.add_argument(
        "--max-tokens", type=options.positive_int, default=128, metavar="N", help="tokens to decode (default: 128)"
    )
    latency.add_argument(
        "--long-prompt-tokens",
        type=options.positive_int,
        default=2000,
        metavar="N",
        help="the long prompt's length (default: 2000)",
    )
    latency.add_argument(
        "--repeat", type=options.positive_int, default=3, metavar="N", help="runs of each engine (default: 3)"
    )
    latency.add_argument(
        "--workload",
        choices=["chat", "code-edit"],
        default="chat",
        help="the decoded prompt: a chat question, or code from the prompt written back with one change, where "
        "prompt-lookup speculation (--speculative-config) finds its drafts (default: chat)",
    )
    latency.add_argument("--baseline", choices=["llama.cpp"], help="also run llama.cpp on the same GGUF file")
    latency.add_argument(
        "--baseline-python",
        metavar="PYTHON",
        help="an interpreter with llama-cpp-python installed (default: this one)",
    )
    sharing = bench_commands.add_parser(
        "sharing",
        parents=[engine_options],
        help="KV blocks saved by sharing; prefill saved by prefix caching",
        description="Parallel sampling (n=2,4,6) and beam search (width 2,4,6) on synthetic, seeded prompt/output "
        "length mixes shaped like Alpaca and ShareGPT: KV blocks in use with sharing against what the "
        "sequences would hold without it, beside the PagedAttention paper's figures. Then the prefill "
        "time of requests sharing a 1-shot / 5-shot prefix, prefix cache off and on.",
    )
    sharing.add_argument(
        "--workload", action="append", choices=["alpaca", "sharegpt"], help="length mix (repeatable; default: both)"
    )
    sharing.add_argument(
        "--num-requests", type=options.positive_int, default=8, metavar="N", help="requests per run (default: 8)"
    )
    sharing.add_argument(
        "--max-prompt-len",
        type=options.positive_int,
        default=512,
        metavar="N",
        help="cap on drawn prompt lengths (default: 512)",
    )
    sharing.add_argument(
        "--max-output-len",
        type=options.positive_int,
        default=512,
        metavar="N",
        help="cap on drawn output lengths (default: 512)",
    )
    sharing.add_argument(
        "--prefix-requests",
        type=int,
        default=16,
        metavar="N",
        help="requests in the prefix-caching runs; 0 skips them (default: 16)",
    )
    sharing.add_argument("--seed", type=int, default=0, metavar="N")

    heartbeat = bench_commands.add_parser(
        "ui-heartbeat",
        parents=[engine_options],
        help="how long the window's UI thread stalls while a batch runs with the monitor open",
        description="Opens the main window offscreen on the model, shows the Monitor page and runs the workload "
        "through the Batch page (greedy), while a 10 ms timer on the UI thread records the gaps between its ticks. "
        "Prints the largest gap, p99 and p50, and the batch's tokens per second; exit status 1 when the largest "
        "gap is 100 ms or more. Needs PySide6 (no display).",
    )
    heartbeat.add_argument("--prompts", type=Path, metavar="FILE.jsonl", help="default: the built-in W64 workload")
    heartbeat.add_argument(
        "--num-prompts", type=options.positive_int, metavar="N", help="use the first N requests (default: all 64)"
    )
    heartbeat.add_argument(
        "--max-tokens", type=options.positive_int, metavar="N", help="new tokens per request, in place of the file's"
    )

    models = commands.add_parser(
        "models",
        help="the local model library: list, look at a Hub repo's files, pull from the Hugging Face Hub, remove",
        description="Models pulled from the Hugging Face Hub go to the standard Hugging Face cache "
        "(HF_HUB_CACHE), where other tools find them too; the default GGUF model lives in "
        "kvstudio's data dir.",
    )
    models_commands = models.add_subparsers(dest="models_command", title="actions", metavar="ACTION", required=True)
    models_commands.add_parser(
        "list", help="models kvstudio can run: name, size, family, quantization, context length, memory"
    )
    files = models_commands.add_parser(
        "files",
        help="what a Hub repo offers: each GGUF file with its size, quantization, sha256 and whether it fits here",
        description="List a Hub repo's GGUF files (a K-quant mix, Q8_0, F16...) with their sizes, the "
        "quantization each file's name says, how the engine holds it, its sha256, and the memory it would occupy "
        "here with the default engine options; for a transformers repo, the files a pull fetches.",
    )
    files.add_argument("repo", metavar="ORG/NAME[@REV]")
    pull = models_commands.add_parser(
        "pull",
        help="download a model from the Hub (an interrupted pull resumes when run again)",
        description="Download what the engine needs (config, tokenizer, safetensors weights) of a Hub model, or "
        "one GGUF file of a repo of quantizations: ORG/NAME:Q4_K_M, or --file NAME.gguf.",
    )
    pull.add_argument("repo", metavar="ORG/NAME[@REV][:QUANT]")
    pull.add_argument(
        "--file", metavar="NAME.gguf", help="the GGUF file to download (kvstudio models files lists them)"
    )
    rm = models_commands.add_parser(
        "rm", help="delete a model (every cached revision, or one GGUF file) and say the space freed"
    )
    rm.add_argument("name", metavar="NAME", help="as `kvstudio models list` shows it")
    rm.add_argument("--force", action="store_true", help="also remove the default model")

    doctor = commands.add_parser(
        "doctor",
        help="what this machine offers kvstudio, and what is missing",
        description="Print torch, CUDA, GPU and RAM, the largest model that fits, triton, the Qt platform, the "
        "model store and its free disk, then what is missing. Exit status 0 when kvstudio can run "
        "here, 1 when it cannot.",
    )
    # doctor starts Qt in a child process running this (a plugin that cannot load aborts its process)
    doctor.add_argument("--qt-probe", action="store_true", help=argparse.SUPPRESS)
    return parser
