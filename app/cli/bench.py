"""`kvstudio bench throughput | serve | cancel-storm | latency | sharing`: the command-line side of the benchmarks
in app/bench/. (`bench ui-heartbeat` drives the window: ui/heartbeat_bench.py, handed in by ui/launcher.py.)"""

from __future__ import annotations

import argparse
import gc
import sys

from app.cli.options import engine_kwargs, load_llm


def run(args: argparse.Namespace) -> int:
    if args.bench_command == "ui-heartbeat":  # run by the launcher in ui/, which hands it to app.cli.main.main
        raise ValueError("bench ui-heartbeat opens the window: run it with the kvstudio command")
    if args.bench_command == "serve":
        return run_bench_serve(args)
    if args.bench_command == "cancel-storm":
        return run_bench_cancel_storm(args)
    if args.bench_command == "latency":
        return run_bench_latency(args)
    if args.bench_command == "sharing":
        return run_bench_sharing(args)
    return run_bench_throughput(args)


def run_bench_throughput(args: argparse.Namespace) -> int:
    import torch

    from app.bench import throughput as bench
    from engine import render_chat

    requests = bench.load_workload(args.prompts or bench.BUILTIN_WORKLOAD, args.num_prompts, args.max_tokens)
    if args.baseline == "hf" and len({r.max_tokens for r in requests}) > 1:
        raise ValueError("--baseline hf runs static batches with one max_tokens: give --max-tokens")
    params = [bench.greedy_params(r) for r in requests]
    llm = load_llm(args.model, engine_kwargs(args))
    model = llm.llm_engine.config.model
    tokenizer = llm.get_tokenizer()
    prompt_ids = [render_chat(tokenizer, r.messages)["prompt_token_ids"] for r in requests]
    print(
        f"{len(requests)} requests, {sum(map(len, prompt_ids))} prompt tokens, "
        f"{sum(r.max_tokens for r in requests)} tokens to generate; torch threads: {torch.get_num_threads()}"
    )
    ours = bench.run_engine(llm.llm_engine, prompt_ids, params)
    print(ours.summary(), flush=True)
    if args.json_schema is not None:
        schema = bench.load_json_schema(args.json_schema)
        llm.reset_prefix_cache()  # the constrained run computes its prompts afresh too
        constrained = bench.run_engine(llm.llm_engine, prompt_ids, [bench.greedy_params(r, schema) for r in requests])
        print(f"{constrained.summary().replace('kvstudio', 'kvstudio + JSON schema', 1)}")
        print(f"constrained / free: {constrained.tokens_per_s / ours.tokens_per_s:.1%}")
    if args.baseline != "hf":
        return 0
    del llm  # free the engine's weights and KV pool before the baseline's model loads
    gc.collect()
    hf_model, pad_token_id = bench.load_hf_model(model)
    theirs = bench.run_hf_generate(hf_model, pad_token_id, prompt_ids, requests[0].max_tokens)
    print(theirs.summary())
    print(f"kvstudio / hf: {ours.tokens_per_s / theirs.tokens_per_s:.2f}x")
    return 0


def run_bench_latency(args: argparse.Namespace) -> int:
    import os

    from app.bench import latency
    from app.library import model_store

    model = args.model or str(model_store.ensure_default_model())
    if args.baseline and not model.endswith(".gguf"):
        raise ValueError("--baseline llama.cpp reads GGUF files: give --model FILE.gguf")
    threads = args.threads or os.cpu_count() or 1
    chat = latency.chat_text(model, args.workload)
    engines = ["kvstudio"] + (["llama.cpp"] if args.baseline else [])
    python = {"kvstudio": sys.executable, "llama.cpp": args.baseline_python or sys.executable}
    runs: dict[str, list] = {e: [] for e in engines}
    print(
        f"{model}: {args.workload} prompt, {threads} threads, {args.max_tokens} tokens decoded, "
        f"{args.repeat} runs of each engine"
    )
    for i in range(args.repeat):  # alternating, so a busy moment of the machine hits both engines alike
        for engine in engines:
            result = latency.run_child(
                engine,
                model,
                threads,
                args.max_tokens,
                args.long_prompt_tokens,
                python[engine],
                engine_kwargs(args),
                chat,
            )
            runs[engine].append(result)
            print(f"run {i + 1} {engine}: {result.decode_tok_s:.1f} tok/s, TTFT {result.ttft_s:.3f} s", flush=True)
    print(latency.format_table([latency.median_result(runs[e]) for e in engines]))
    return 0


def run_bench_serve(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import urllib.request

    from app.bench import serve as bench_serve
    from app.bench import throughput as bench

    requests = bench.load_workload(args.prompts or bench.BUILTIN_WORKLOAD, args.num_prompts, args.max_tokens)
    if len({r.max_tokens for r in requests}) > 1:
        raise ValueError("bench serve streams one max_tokens for all requests: give --max-tokens")
    stop = None
    if args.url is None:
        from app.engine_thread import EngineThread
        from app.server.app import ServerConfig
        from app.server.run import BackgroundServer, model_info

        engine = load_llm(args.model, engine_kwargs(args)).llm_engine
        thread = EngineThread(engine).start()
        server = BackgroundServer(thread, model_info(engine, args.served_model_name), ServerConfig(port=0)).start()
        url = server.url + "/v1"

        def stop() -> None:
            server.stop()
            thread.stop()
    else:
        url = args.url.rstrip("/")
    try:
        model = args.served_model_name
        if model is None:
            headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
            with urllib.request.urlopen(urllib.request.Request(url + "/models", headers=headers), timeout=30) as r:
                model = json.load(r)["data"][0]["id"]
        print(
            f"{url}, model {model}: {len(requests)} chat requests x {requests[0].max_tokens} tokens per level",
            flush=True,
        )
        results = []
        for concurrency in args.concurrency:
            results.append(
                asyncio.run(
                    bench_serve.run_level(
                        url, model, args.api_key, [r.messages for r in requests], requests[0].max_tokens, concurrency
                    )
                )
            )
            print(
                f"concurrency {concurrency}: {results[-1].output_tokens_per_s:.1f} tok/s", file=sys.stderr, flush=True
            )
        print(bench_serve.table(results))
    finally:
        if stop is not None:
            stop()
    return 0


def run_bench_cancel_storm(args: argparse.Namespace) -> int:
    """A subcommand of its own rather than a `bench serve` option: its requests, options and output differ from
    the latency levels', and its checks read the engine's KV blocks, so it runs only against its own endpoint."""
    from app.bench import cancel_storm
    from app.engine_thread import EngineThread
    from app.server.app import ServerConfig
    from app.server.run import BackgroundServer, model_info

    engine = load_llm(args.model, engine_kwargs(args)).llm_engine
    thread = EngineThread(engine).start()
    info = model_info(engine)
    server = BackgroundServer(thread, info, ServerConfig(port=0)).start()
    try:
        print(f"{server.url}/v1, model {info.name}: the storm is on", file=sys.stderr, flush=True)
        report = cancel_storm.run(server, thread, info.name, args.requests, args.clients, args.seed)
    except cancel_storm.StormError as e:
        print(f"kvstudio: error: {e}", file=sys.stderr)
        return 1
    finally:
        server.stop()
        thread.stop()
    print(report.table())
    return 0 if report.passed else 1


def run_bench_sharing(args: argparse.Namespace) -> int:
    from app.bench import sharing as bs

    kwargs = engine_kwargs(args)
    llm = load_llm(args.model, {**kwargs, "enable_prefix_caching": False})
    engine = llm.llm_engine
    results = []
    for name in args.workload or list(bs.MIXES):
        for kind in ("parallel sampling", "beam search"):
            for width in bs.WIDTHS:
                result = bs.measure_sharing(
                    engine,
                    bs.MIXES[name],
                    kind,
                    width,
                    args.num_requests,
                    args.seed,
                    args.max_prompt_len,
                    args.max_output_len,
                )
                print(f"{name} {kind} {width}: {result.saved:.1%} saved", file=sys.stderr, flush=True)
                results.append(result)
    print(bs.sharing_table(results), flush=True)
    if args.prefix_requests <= 0:
        return 0
    del llm, engine
    gc.collect()
    model = args.model

    def make_engine(caching: bool):
        return load_llm(model, {**kwargs, "enable_prefix_caching": caching}).llm_engine

    prefix = [
        bs.measure_prefix_caching(make_engine, name, tokens, args.prefix_requests, args.seed)
        for name, tokens in bs.SHOT_PREFIXES
    ]
    print()
    print(bs.prefix_table(prefix, args.prefix_requests))
    return 0
