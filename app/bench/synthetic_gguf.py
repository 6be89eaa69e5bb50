"""A GGUF file shaped like a real model, with random weights, for benchmarks of models nobody ships here: by
default Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 query / 8 KV heads, MLP 8192, a 128,256-token vocabulary,
tied embeddings) in Q4_K or Q8_0, the quantizations people download.

The tokenizer is the default model's (SmolLM2's byte-level BPE and chat template), padded with reserved control
tokens up to the vocabulary size, so kvstudio and llama.cpp tokenize the same prompts alike. The weights are
random blocks of the chosen type scaled like a trained model's (about 0.02 spread): what they compute is noise,
but every byte a real model of that size reads is read.

    python -m app.bench.synthetic_gguf OUT.gguf [--type Q4_K|Q8_0|Q4_0] [--layers N] ...
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T


@dataclass(frozen=True)
class Shape:
    hidden: int = 2048
    layers: int = 16
    heads: int = 32
    kv_heads: int = 8
    intermediate: int = 8192
    vocab: int = 128256
    context: int = 8192
    rope_theta: float = 500000.0


def random_blocks(rows: int, cols: int, kind: T, rng: np.random.Generator) -> np.ndarray:
    """[rows, bytes per row] uint8 blocks of `kind` whose weights spread about 0.02 around 0."""
    per_block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    blocks = rows * cols // per_block
    if kind == T.Q8_0:  # fp16 d, 32 int8 codes: d * q
        d = np.full((blocks, 1), 0.035 / 127, dtype=np.float16).view(np.uint8)
        q = rng.integers(-127, 128, size=(blocks, 32), dtype=np.int8).view(np.uint8)
        data = np.concatenate([d, q], axis=1)
    elif kind == T.Q4_0:  # fp16 d, 16 bytes of nibbles: d * (q - 8)
        d = np.full((blocks, 1), 0.035 / 8, dtype=np.float16).view(np.uint8)
        data = np.concatenate([d, rng.integers(0, 256, size=(blocks, 16), dtype=np.uint8)], axis=1)
    elif kind == T.Q4_K:  # fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
        dd = np.array([[0.07 / (63 * 15), 0.035 / 63]], dtype=np.float16).view(np.uint8).repeat(blocks, axis=0)
        scales = rng.integers(0, 256, size=(blocks, 12), dtype=np.uint8)
        data = np.concatenate([dd, scales, rng.integers(0, 256, size=(blocks, 128), dtype=np.uint8)], axis=1)
    else:
        raise ValueError(f"{kind.name} is not one of Q4_K, Q8_0, Q4_0")
    assert data.shape[1] == block_bytes
    return data.reshape(rows, -1)


def write(path: Path, kind: T, shape: Shape, tokenizer_gguf: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    source = gguf.GGUFReader(tokenizer_gguf)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(f"Random Llama-3.2-1B-shaped ({kind.name})")
    writer.add_block_count(shape.layers)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_rope_dimension_count(shape.hidden // shape.heads)
    writer.add_vocab_size(shape.vocab)
    file_types = {T.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_M, T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types.get(kind, gguf.LlamaFileType.MOSTLY_Q4_0))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _copy_tokenizer(source, writer, shape.vocab)

    head_dim = shape.hidden // shape.heads
    matrices = {
        "token_embd.weight": (shape.vocab, shape.hidden),
        **{
            f"blk.{i}.{name}.weight": dims
            for i in range(shape.layers)
            for name, dims in (
                ("attn_q", (shape.heads * head_dim, shape.hidden)),
                ("attn_k", (shape.kv_heads * head_dim, shape.hidden)),
                ("attn_v", (shape.kv_heads * head_dim, shape.hidden)),
                ("attn_output", (shape.hidden, shape.heads * head_dim)),
                ("ffn_gate", (shape.intermediate, shape.hidden)),
                ("ffn_up", (shape.intermediate, shape.hidden)),
                ("ffn_down", (shape.hidden, shape.intermediate)),
            )
        },
    }
    for name, (rows, cols) in matrices.items():
        writer.add_tensor(name, random_blocks(rows, cols, kind, rng), raw_dtype=kind)  # shape from the blocks
    ones = np.ones(shape.hidden, dtype=np.float32)
    for i in range(shape.layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
    writer.add_tensor("output_norm.weight", ones)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _copy_tokenizer(source: gguf.GGUFReader, writer: gguf.GGUFWriter, vocab: int) -> None:
    """The source file's BPE tokenizer and chat template, its vocabulary padded with control tokens to `vocab`."""

    def field(name: str):
        f = source.fields[name]
        return f.contents()

    tokens = list(field("tokenizer.ggml.tokens"))
    types = list(field("tokenizer.ggml.token_type"))
    if len(tokens) > vocab:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens, more than the vocabulary of {vocab}")
    pad = vocab - len(tokens)
    tokens += [f"<|reserved_special_token_{i}|>" for i in range(pad)]
    types += [gguf.TokenType.CONTROL] * pad
    writer.add_tokenizer_model(field("tokenizer.ggml.model"))
    writer.add_tokenizer_pre(field("tokenizer.ggml.pre"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(list(field("tokenizer.ggml.merges")))
    for key, add in (
        ("tokenizer.ggml.bos_token_id", writer.add_bos_token_id),
        ("tokenizer.ggml.eos_token_id", writer.add_eos_token_id),
        ("tokenizer.ggml.unknown_token_id", writer.add_unk_token_id),
        ("tokenizer.ggml.padding_token_id", writer.add_pad_token_id),
    ):
        if key in source.fields:
            add(int(field(key)))
    if "tokenizer.chat_template" in source.fields:
        writer.add_chat_template(field("tokenizer.chat_template"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--type", default="Q4_K", choices=["Q4_K", "Q8_0", "Q4_0"])
    parser.add_argument(
        "--tokenizer-gguf", type=Path, help="the GGUF whose tokenizer is copied (default: the default model)"
    )
    for name, default in vars(Shape()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args(argv)
    if args.tokenizer_gguf is None:
        from app.library.model_store import ensure_default_model

        args.tokenizer_gguf = ensure_default_model()
    shape = Shape(**{name: getattr(args, name) for name in vars(Shape())})
    write(args.out, T[args.type], shape, args.tokenizer_gguf)
    print(f"{args.out}: {args.out.stat().st_size / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
