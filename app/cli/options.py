"""Options shared by the command line's commands: engine and sampling options, and loading the engine from them."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING

from app.library import model_store

if TYPE_CHECKING:
    from engine import LLM, SamplingParams

# Sampling defaults for text read by a person (generate and the chat loop); the benchmark is always greedy.
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.7


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def engine_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("engine options")
    group.add_argument(
        "--model",
        help="a .gguf file, a Hugging Face model directory or repo id (org/name[@rev]); "
        f"default: {model_store.default_model_path()}, fetched on first use",
    )
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="weights and activations (auto: float32 on the CPU)",
    )
    group.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16", "fp8"],
        help="KV cache elements (auto: as --dtype, but float16 for quantized weights on the CPU; fp8: e4m3, GPU only)",
    )
    group.add_argument(
        "--max-model-len",
        type=positive_int,
        metavar="N",
        help="longest sequence, prompt and output (default: the model's context)",
    )
    group.add_argument(
        "--block-size",
        type=positive_int,
        metavar="N",
        help="tokens per KV cache block, a power of two (default: the engine's, 16)",
    )
    group.add_argument(
        "--max-num-seqs", type=positive_int, metavar="N", help="most sequences in one step (default: the engine's)"
    )
    group.add_argument(
        "--max-num-batched-tokens",
        type=positive_int,
        metavar="N",
        help="most tokens in one step (default: the engine's)",
    )
    group.add_argument(
        "--kv-cache-memory", type=positive_float, metavar="GIB", help="KV cache size in GiB (default: the engine's)"
    )
    group.add_argument("--no-prefix-caching", action="store_true", help="do not reuse cached prompt prefixes")
    group.add_argument(
        "--swap-space",
        type=non_negative_float,
        metavar="GIB",
        help="host memory for preempted requests' KV blocks (default: the engine's, 4 GiB)",
    )
    group.add_argument(
        "--preemption-mode",
        choices=["swap", "recompute"],
        help="force one way of preempting (default: swap requests with several sequences, recompute single ones)",
    )
    group.add_argument(
        "--attention-backend",
        default="auto",
        choices=["auto", "torch", "cpu", "triton"],
        help="auto: Triton kernels on a GPU; on the CPU the compiled CPU kernels (torch ops if they cannot be built)",
    )
    group.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="run every decode step eagerly on a GPU instead of replaying captured CUDA graphs",
    )
    group.add_argument(
        "--no-fused-decode",
        action="store_true",
        help="run every decode step eagerly on the CPU, layer by layer in torch ops, instead of as one compiled call",
    )
    group.add_argument(
        "--quantization",
        default="auto",
        choices=["auto", "none", "int8", "int4"],
        help="weights kept quantized: auto keeps a GGUF file's quantization (Q4_* as 4-bit, Q5_*/Q6_K/Q8_0 as 8-bit "
        "per 32 weights); none: every weight in --dtype; int8 / int4: quantize every linear layer at load",
    )
    group.add_argument(
        "--threads", type=positive_int, metavar="N", help="torch CPU threads (default: torch's, one per core)"
    )
    group.add_argument(
        "--speculative-config",
        type=json_object,
        metavar="JSON",
        help='speculative decoding, vLLM\'s names: \'{"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_max": 4, "prompt_lookup_min": 1}\' (prompt lookup: drafts from earlier text of the '
        "prompt or reply, verified in one pass; outputs unchanged)",
    )
    return parent


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"must be a JSON object: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text}")
    return value


def sampling_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("sampling options")
    group.add_argument(
        "--max-tokens",
        type=positive_int,
        default=DEFAULT_MAX_TOKENS,
        metavar="N",
        help=f"most new tokens per reply (default: {DEFAULT_MAX_TOKENS})",
    )
    group.add_argument(
        "--temperature",
        type=float,
        default=DEFAULT_TEMPERATURE,
        metavar="T",
        help=f"0 is greedy (default: {DEFAULT_TEMPERATURE})",
    )
    group.add_argument("--top-p", type=float, default=1.0, metavar="P")
    group.add_argument("--top-k", type=int, default=-1, metavar="K", help="-1 or 0: off")
    group.add_argument("--min-p", type=float, default=0.0, metavar="P")
    group.add_argument("--seed", type=int, metavar="N", help="makes sampling repeatable")
    group.add_argument("--stop", action="append", metavar="TEXT", help="stop at this text (repeatable)")
    group.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        help="apply the model's chat template to the prompt (default: when the model has one)",
    )
    return parent


def engine_kwargs(args: argparse.Namespace) -> dict:
    """LLM(...) keyword arguments from the engine options; those not given keep the engine's defaults."""
    kwargs = {
        "dtype": args.dtype,
        "kv_cache_dtype": args.kv_cache_dtype,
        "enable_prefix_caching": not args.no_prefix_caching,
        "quantization": args.quantization,
        "attention_backend": args.attention_backend,
    }
    if args.no_cuda_graphs:
        kwargs["cuda_graphs"] = False
    if args.no_fused_decode:
        kwargs["cpu_fused_decode"] = False
    for name in (
        "max_model_len",
        "block_size",
        "max_num_seqs",
        "max_num_batched_tokens",
        "kv_cache_memory",
        "swap_space",
        "preemption_mode",
        "speculative_config",
    ):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    from engine import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        stop=args.stop,
    )


def load_llm(model: str | None, kwargs: dict) -> LLM:
    """The engine on `model` (None: the default model, fetched into the store if absent)."""
    from engine import LLM

    path = model if model is not None else str(model_store.ensure_default_model())
    print(f"kvstudio: loading {path}", file=sys.stderr)
    start = time.perf_counter()
    llm = LLM(path, **kwargs)
    print(f"kvstudio: model ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return llm


def has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
