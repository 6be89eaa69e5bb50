"""`kvstudio models`: the local library (list), a Hub repo's files and what each would need here (files),
downloads (pull) and removal (rm)."""

from __future__ import annotations

import argparse
import sys

from app.units import byte_size


def run_models(args: argparse.Namespace) -> int:
    from app.library import hub_models, pulls

    try:
        if args.models_command == "list":
            return list_models()
        if args.models_command == "files":
            return list_repo_files(args.repo)
        if args.models_command == "pull":
            from tqdm import tqdm

            with tqdm(unit="B", unit_scale=True, desc=args.repo) as bar:

                def progress(done: int, total: int) -> None:
                    bar.total = total
                    bar.update(done - bar.n)

                path = pulls.pull(args.repo, progress=progress, file=args.file)
            print(path)
            return 0
        print(f"Removed {args.name}, freed {byte_size(hub_models.remove(args.name, force=args.force))}.")
        return 0
    except hub_models.HubError as e:
        print(f"kvstudio: error: {e}", file=sys.stderr)
        return 1


def list_models() -> int:
    """`kvstudio models list`: each model with its size, family, quantization, context and memory verdict."""
    from app.library import hub_models, machine

    models = hub_models.list_local_models()
    if not models:
        print("The library is empty: `kvstudio models pull ORG/NAME` downloads a model.")
        return 0
    memory = machine.machine_memory()
    width = max(len(m.name) for m in models)
    for m in models:
        context = "?" if m.context_length is None else str(m.context_length)
        fit = None if m.weights is None else machine.check_weights(m.weights, memory)
        print(
            f"{m.name:<{width}}  {byte_size(m.size):>9}  {m.family:<20}  {m.quant or '?':<7}  "
            f"context {context:<7}"
            + (f"  {fit.verdict} ({byte_size(fit.needed)})" if fit else "")
            + ("  (default)" if m.is_default else "")
            + (f"  cannot load: {m.problem}" if m.problem else "")
        )
    return 0


def list_repo_files(repo: str) -> int:
    """`kvstudio models files`: what a Hub repo offers to pull, and what each choice would need here."""
    from app.library import machine, pulls
    from app.library.quant_types import quant_type

    found = pulls.list_files(repo)
    memory = machine.machine_memory()
    dtype_bytes, _ = machine.load_format(memory, {})
    shown = found.ref.shown
    if found.model_files:
        total = sum(f.size for f in found.model_files)
        fit = None if found.num_params is None else machine.check_fit(found.num_params, memory)
        print(
            f"{shown}: a safetensors model; `kvstudio models pull {shown}` downloads these "
            f"{len(found.model_files)} files, {byte_size(total)}." + (f" {fit.message}" if fit else "")
        )
        for file in found.model_files:
            print(f"  {byte_size(file.size):>9}  {file.name}  {file.sha256 or ''}")
    if found.choices:
        print(
            f"{shown}: {len(found.choices)} GGUF model{'s' if len(found.choices) != 1 else ''}; "
            f"`kvstudio models pull {shown}:QUANT` downloads one. Memory: what it would occupy here with its KV "
            f"cache, {byte_size(memory.available)} free."
        )
        rows = []
        notes = []
        for choice in found.choices:
            kind = None if choice.label is None else quant_type(choice.label)
            if choice.problem is not None:
                memory_text, loads_as = "can't load", "-"
                notes.append(f"{choice.name} {choice.problem}.")
            else:
                fit = machine.check_gguf_file(choice.size, choice.label, memory)
                memory_text = f"{fit.verdict} ({byte_size(fit.needed)})"
                loads_as = "?" if kind is None or kind.ggml is None else kind.loads_as(dtype_bytes)
                if kind is not None and kind.kept is None:
                    notes.append(kind.note(dtype_bytes) + ".")
            size = byte_size(choice.size)
            rows.append((choice.label or "?", size, memory_text, loads_as, choice.name, choice.sha256 or ""))
        header = ("QUANT", "SIZE", "MEMORY", "LOADS AS", "FILE", "SHA256")
        widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header) - 1)]
        for row in (header, *rows):
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1])
        for note in dict.fromkeys(notes):
            print(f"  {note}")
    return 0
