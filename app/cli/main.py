"""The kvstudio command line: generate text, chat in the terminal, measure throughput.

The engine (and torch with it) is imported only once a command runs, so `kvstudio --help` and argument errors
answer at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping

from app.cli import options
from app.cli.parser import build_parser
from app.cli.terminal_chat import chat_loop, stream_completion, use_chat_template
from app.library import model_store

# The benchmarks that drive the window, by name: each takes the parsed arguments and returns the exit status.
WindowBenchmarks = Mapping[str, Callable[[argparse.Namespace], int]]


def run_generate(args: argparse.Namespace) -> int:
    from engine import render_chat

    params = options.sampling_params(args)  # bad values fail here, before the model loads
    prompt = args.prompt
    if prompt is None and not sys.stdin.isatty():
        # `echo "..." | kvstudio generate` ends the prompt with a newline the user did not mean as part of it
        prompt = sys.stdin.read().rstrip("\n")
        if not prompt.strip():
            raise ValueError("no prompt: give one as an argument or on stdin")
    llm = options.load_llm(args.model, options.engine_kwargs(args))
    if prompt is None:
        if args.chat is False:
            raise ValueError("the interactive chat needs the chat template; leave out --no-chat")
        chat_loop(llm, params)
        return 0
    tokenizer = llm.get_tokenizer()
    if use_chat_template(args.chat, tokenizer):
        request = render_chat(tokenizer, [{"role": "user", "content": prompt}])
    else:
        request = prompt
    stream_completion(llm.llm_engine, "generate", request, params, sys.stdout)
    sys.stdout.write("\n")
    return 0


def run_default() -> int:
    """No command and no display (the launcher in ui/ opens the window when there is one): a chat in the
    terminal on the default model."""
    from engine import SamplingParams

    reason = "the desktop window needs a display (neither DISPLAY nor WAYLAND_DISPLAY is set)"
    print(f"kvstudio: {reason}; starting a chat in the terminal instead.", file=sys.stderr)
    llm = options.load_llm(None, {})
    chat_loop(llm, SamplingParams(max_tokens=options.DEFAULT_MAX_TOKENS, temperature=options.DEFAULT_TEMPERATURE))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import logging

    from app.server.app import ServerConfig
    from app.server.run import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = ServerConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        cors_origins=tuple(args.cors_origin),
        drain_timeout=args.drain_timeout,
    )
    if not config.loopback:
        print(
            f"kvstudio: warning: binding {args.host} exposes the endpoint to the network"
            + ("" if args.api_key else "; consider --api-key"),
            file=sys.stderr,
        )
    llm = options.load_llm(args.model, options.engine_kwargs(args))
    serve(llm.llm_engine, config, args.served_model_name, args.max_queue)
    return 0


def main(argv: list[str] | None = None, window_benchmarks: WindowBenchmarks | None = None) -> int:
    """window_benchmarks: the benchmarks that open the window (`bench ui-heartbeat`), by name, as the launcher in
    ui/ hands them in: app/ never imports Qt, and they import it only once they run."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None) is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        if args.command == "generate":
            return run_generate(args)
        if args.command == "serve":
            return run_serve(args)
        if args.command == "bench":
            if args.bench_command in (window_benchmarks or {}):
                return window_benchmarks[args.bench_command](args)
            from app.cli import bench as bench_commands

            return bench_commands.run(args)
        if args.command == "models":
            from app.cli import models

            return models.run_models(args)
        if args.command == "doctor":
            from app.cli import doctor

            return doctor.main(qt_probe=args.qt_probe)
        return run_default()
    except ValueError as e:  # a bad argument the parser could not see: a value, a file, a model
        print(f"kvstudio: error: {e}", file=sys.stderr)
        return 2
    except model_store.ModelStoreError as e:
        print(f"kvstudio: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
