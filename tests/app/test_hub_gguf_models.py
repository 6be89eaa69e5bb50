"""`kvstudio models files | pull | rm` on Hub repos of GGUF files, against a fake Hugging Face Hub served on
loopback: listing them, choosing one by --file or :QUANT, resuming, a corrupt download, the engine loading one."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from huggingface_hub import try_to_load_from_cache

from app.cli import main as cli
from app.library import gguf_files, hub_files, hub_models, machine, pulls
from app.library.gguf_files import gguf_choices
from app.library.hub_search import search_hub
from app.library.machine import CPU_RESERVE, GIB, MachineMemory
from app.library.quant_types import label_from_name
from app.units import byte_size


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["models", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def expected_files(tiny_chat_model: Path) -> set[str]:
    return {p.name for p in tiny_chat_model.iterdir() if p.is_file()}


@pytest.fixture
def gguf_hub(serve_hub, gguf_repo, tiny_chat_model):
    tiny = {p.name: p.read_bytes() for p in sorted(tiny_chat_model.iterdir()) if p.is_file()}
    return serve_hub(
        {
            "org/tiny-GGUF": gguf_repo,
            "org/tiny": tiny,
            "org/tiny-both": {**tiny, "tiny-Q8_0.gguf": gguf_repo["tiny-Q8_0.gguf"]},
        },
        {"org/tiny-GGUF": 900, "org/tiny": 500, "org/tiny-both": 10},
        num_params={"org/tiny-GGUF": 606_976, "org/tiny": 4_200_000},
    )


def snapshot_of(repo_id: str, hub) -> Path:
    return hub_files.repo_dir(repo_id) / "snapshots" / hub.commit


def gguf_gets(hub, name: str) -> list[str | None]:
    """Range headers of the GETs of one GGUF file, in order."""
    return [r for _, path, r in hub.requests if path.endswith(f"/resolve/{hub.commit}/{name}")]


@pytest.mark.parametrize(
    "name, label",
    [
        ("SmolLM2-135M-Instruct-Q4_K_M.gguf", "Q4_K_M"),
        ("smollm2-135m-instruct.q8_0.gguf", "Q8_0"),
        ("Llama-3.2-1B-Instruct-IQ4_XS.gguf", "IQ4_XS"),
        ("Llama-3.2-1B-Instruct-BF16.gguf", "BF16"),
        ("qwen2.5-0.5b-instruct-fp16.gguf", "F16"),
        ("Qwen3-4B-UD-Q4_K_XL.gguf", "Q4_K_XL"),
        ("Q8_0/model-Q8_0-00001-of-00002.gguf", "Q8_0"),
        ("ggml-model.gguf", None),
    ],
)
def test_the_quantization_is_read_from_the_file_name(name, label):
    assert label_from_name(name) == label


def test_gguf_choices_group_split_files_and_name_each_by_its_quantization(gguf_repo):
    files = [hub_files.RemoteFile(n, len(d), str(i), None) for i, (n, d) in enumerate(gguf_repo.items())]
    choices = gguf_choices(files)
    assert [(c.ref, c.label, c.size) for c in choices] == sorted(
        [
            ("Q2_K", "Q2_K", len(gguf_repo["tiny-Q2_K-00001-of-00002.gguf"]) * 2),
            ("IQ4_XS", "IQ4_XS", len(gguf_repo["tiny-IQ4_XS.gguf"])),
            ("Q4_K_M", "Q4_K_M", len(gguf_repo["tiny-Q4_K_M.gguf"])),
            ("Q8_0", "Q8_0", len(gguf_repo["tiny-Q8_0.gguf"])),
            ("F16", "F16", len(gguf_repo["tiny-F16.gguf"])),
        ],
        key=lambda c: c[2],
    )  # no README, no vision projector; the split model one choice of both parts
    [split] = [c for c in choices if c.label == "Q2_K"]
    assert split.name == "tiny-Q2_K-00001-of-00002.gguf" and len(split.parts) == 2
    assert "split into 2 files" in split.problem and "llama-gguf-split --merge" in split.problem
    assert [c.problem for c in choices if c is not split] == [None] * 4
    # a label two files share names each by its file; a split model missing a part says so
    twins = gguf_choices([*files, hub_files.RemoteFile("tiny-imat-Q8_0.gguf", 5, "x", None)])
    assert sorted(c.ref for c in twins if c.label == "Q8_0") == ["tiny-Q8_0.gguf", "tiny-imat-Q8_0.gguf"]
    [lone] = gguf_choices([hub_files.RemoteFile("m-Q8_0-00002-of-00003.gguf", 5, "y", None)])
    assert lone.problem == "is split into parts, 2 of which the repo lacks"


def test_search_finds_gguf_repos_too_and_says_which_kind(gguf_hub):
    found = search_hub("tiny")
    assert [(m.name, m.formats, m.num_params) for m in found] == [
        ("org/tiny-GGUF", ("gguf",), 606_976),
        ("org/tiny", ("safetensors",), 4_200_000),
        ("org/tiny-both", ("safetensors", "gguf"), None),
    ]
    assert [m.is_gguf for m in found] == [True, False, True]


def test_files_lists_each_gguf_with_size_quant_fit_and_sha256(gguf_hub, gguf_repo, monkeypatch, capsys):
    monkeypatch.setattr(machine, "machine_memory", lambda: MachineMemory("cpu", 64 * GIB, 32 * GIB, 4, CPU_RESERVE))
    code, out, err = run(capsys, "files", "org/tiny-GGUF")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("org/tiny-GGUF: 5 GGUF models; `kvstudio models pull org/tiny-GGUF:QUANT` downloads")
    assert lines[1].split() == ["QUANT", "SIZE", "MEMORY", "LOADS", "AS", "FILE", "SHA256"]
    rows = {line.split()[0]: line for line in lines[2:7]}
    q8 = gguf_repo["tiny-Q8_0.gguf"]
    assert rows["Q8_0"].split() == [
        "Q8_0",
        *byte_size(len(q8)).split(),
        "fits",
        "(2.5",
        "GiB)",
        "8.5-bit",
        "(q8g32)",
        "tiny-Q8_0.gguf",
        hashlib.sha256(q8).hexdigest(),
    ]
    assert "4.625-bit (q4k)" in rows["Q4_K_M"] and "float32" in rows["IQ4_XS"] and "float32" in rows["F16"]
    assert "can't load" in rows["Q2_K"] and "tiny-Q2_K-00001-of-00002.gguf" in rows["Q2_K"]
    notes = lines[7:]
    assert "  kvstudio cannot keep IQ4_XS quantized: this file loads in float32" in "\n".join(notes)
    assert any("tiny-Q2_K-00001-of-00002.gguf is split into 2 files" in n for n in notes)
    # a transformers repo: the files a pull fetches, and whether its parameters fit
    code, out, _ = run(capsys, "files", "org/tiny")
    assert code == 0 and out.startswith("org/tiny: a safetensors model; `kvstudio models pull org/tiny` downloads")
    assert ". Fits: needs about 2.5 GiB" in out.splitlines()[0] and "config.json" in out
    code, _, err = run(capsys, "files", "org/missing")
    assert code == 1 and "no model org/missing on the Hub" in err


def test_pull_by_quant_downloads_one_file_into_the_hf_cache_and_the_library_lists_it(gguf_hub, gguf_repo, capsys):
    code, out, err = run(capsys, "pull", "org/tiny-GGUF:q8_0")  # the label in any case
    assert code == 0, err
    path = snapshot_of("org/tiny-GGUF", gguf_hub) / "tiny-Q8_0.gguf"
    assert out.strip().splitlines()[-1] == str(path) and path.read_bytes() == gguf_repo["tiny-Q8_0.gguf"]
    assert [p.name for p in path.parent.iterdir()] == ["tiny-Q8_0.gguf"]  # that file alone
    assert gguf_gets(gguf_hub, "tiny-Q8_0.gguf") == [f"bytes=0-{gguf_files.HEAD_BYTES - 1}", None]  # head, then all
    assert [p for _, p, _ in gguf_hub.requests if "/resolve/" in p and "Q8_0" not in p] == []
    cache = hub_files.cache_dir()
    assert try_to_load_from_cache("org/tiny-GGUF", "tiny-Q8_0.gguf", cache_dir=cache) == str(path)

    [model] = hub_models.list_local_models()
    assert (model.name, model.path, model.size, model.family, model.context_length, model.quant) == (
        "org/tiny-GGUF:Q8_0",
        path,
        len(gguf_repo["tiny-Q8_0.gguf"]),
        "LlamaForCausalLM",
        2048,
        "Q8_0",
    )
    assert model.weights.resident(4, "auto").how == "Q8_0 kept quantized"
    gguf_hub.requests.clear()
    assert run(capsys, "pull", "org/tiny-GGUF:Q8_0")[0] == 0
    assert gguf_gets(gguf_hub, "tiny-Q8_0.gguf") == []  # a second pull downloads nothing


def test_a_second_gguf_of_the_repo_joins_the_first_and_rm_removes_one(gguf_hub, gguf_repo, capsys):
    assert run(capsys, "pull", "org/tiny-GGUF:Q8_0")[0] == 0
    assert run(capsys, "pull", "org/tiny-GGUF", "--file", "tiny-Q4_K_M.gguf")[0] == 0
    snapshot = snapshot_of("org/tiny-GGUF", gguf_hub)
    assert sorted(p.name for p in snapshot.iterdir()) == ["tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf"]
    assert [(m.name, m.quant) for m in hub_models.list_local_models()] == [
        ("org/tiny-GGUF:Q4_K_M", "Q4_K_M"),
        ("org/tiny-GGUF:Q8_0", "Q8_0"),
    ]
    code, out, _ = run(capsys, "rm", "org/tiny-GGUF:Q8_0")
    freed = byte_size(len(gguf_repo["tiny-Q8_0.gguf"]))
    assert code == 0 and out.strip() == f"Removed org/tiny-GGUF:Q8_0, freed {freed}."
    assert [m.name for m in hub_models.list_local_models()] == ["org/tiny-GGUF:Q4_K_M"]
    assert len(list((snapshot.parent.parent / "blobs").iterdir())) == 1
    assert run(capsys, "rm", "org/tiny-GGUF:Q4_K_M")[0] == 0
    assert not hub_files.repo_dir("org/tiny-GGUF").exists() and hub_models.list_local_models() == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["org/tiny-GGUF"], "org/tiny-GGUF offers 5 GGUF files: choose one with --file NAME.gguf or as"),
        (["org/tiny-GGUF:Q3_K_S"], "org/tiny-GGUF has no GGUF file 'Q3_K_S'; it offers Q2_K, IQ4_XS, Q4_K_M"),
        (["org/tiny-GGUF:Q2_K"], "tiny-Q2_K-00001-of-00002.gguf is split into 2 files, and kvstudio loads a model"),
        (["org/tiny-GGUF:Q8_0", "--file", "tiny-F16.gguf"], "the file after ':' contradicts --file tiny-F16.gguf"),
        (["org/tiny-GGUF:"], "nothing follows ':'"),
    ],
)
def test_a_gguf_pull_that_names_no_loadable_file_fails_in_words(gguf_hub, argv, message, capsys):
    code, _, err = run(capsys, "pull", *argv)
    assert code == 1 and message in err
    assert [p for _, p, _ in gguf_hub.requests if "/resolve/" in p] == [] and hub_models.list_local_models() == []


def test_a_repo_of_both_kinds_pulls_its_safetensors_unless_a_file_is_named(gguf_hub, tiny_chat_model):
    assert pulls.pull("org/tiny-both") == snapshot_of("org/tiny-both", gguf_hub)
    path = pulls.pull("org/tiny-both:Q8_0")
    names = {p.name for p in path.parent.iterdir()}
    assert names == {*expected_files(tiny_chat_model), "tiny-Q8_0.gguf"}  # the model's links stay
    assert [m.name for m in hub_models.list_local_models()] == ["org/tiny-both", "org/tiny-both:Q8_0"]


def test_an_interrupted_gguf_pull_is_listed_and_resumes(gguf_hub, gguf_repo, capsys):
    q8 = gguf_repo["tiny-Q8_0.gguf"]
    gguf_hub.drop_halfway.add("org/tiny-GGUF/tiny-Q8_0.gguf")
    code, _, err = run(capsys, "pull", "org/tiny-GGUF:Q8_0")
    assert code == 1 and "tiny-Q8_0.gguf broke off" in err and "run the pull again to resume it" in err
    assert hub_models.list_local_models() == []
    assert pulls.list_interrupted() == [
        pulls.InterruptedPull("org/tiny-GGUF:Q8_0", "org/tiny-GGUF", len(q8) // 2, len(q8))
    ]
    gguf_hub.requests.clear()
    path = pulls.pull("org/tiny-GGUF:Q8_0")
    # the architecture is read from the part that arrived: only the missing half is asked for
    assert gguf_gets(gguf_hub, "tiny-Q8_0.gguf") == [f"bytes={len(q8) // 2}-"]
    assert path.read_bytes() == q8 and pulls.list_interrupted() == []


def test_a_corrupted_gguf_is_refused_in_words_and_kept_nowhere(gguf_hub, capsys):
    gguf_hub.corrupt.add("org/tiny-GGUF/tiny-Q8_0.gguf")
    code, _, err = run(capsys, "pull", "org/tiny-GGUF:Q8_0")
    assert code == 1
    assert "tiny-Q8_0.gguf arrived corrupted (sha256 mismatch) and was discarded; run the pull again" in err
    blobs = hub_files.repo_dir("org/tiny-GGUF") / "blobs"
    assert list(blobs.iterdir()) == [] and hub_models.list_local_models() == []
    gguf_hub.corrupt.clear()
    assert run(capsys, "pull", "org/tiny-GGUF:Q8_0")[0] == 0 and pulls.list_interrupted() == []


def test_discarding_an_interrupted_gguf_keeps_the_repos_other_file(gguf_hub, gguf_repo):
    pulls.pull("org/tiny-GGUF:Q4_K_M")
    [before] = hub_models.list_local_models()
    gguf_hub.drop_halfway.add("org/tiny-GGUF/tiny-F16.gguf")
    with pytest.raises(hub_models.HubError, match="broke off"):
        pulls.pull("org/tiny-GGUF:F16")
    [pull] = pulls.list_interrupted()
    assert pulls.discard_interrupted(pull.model) == len(gguf_repo["tiny-F16.gguf"]) // 2
    assert pulls.list_interrupted() == [] and hub_models.list_local_models() == [before]


def test_a_gguf_of_an_architecture_kvstudio_cannot_run_is_refused_before_it_downloads(serve_hub, tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "gemma.gguf"
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_tensor("token_embd.weight", np.ones((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    hub = serve_hub({"org/gemma-GGUF": {"gemma-F32.gguf": path.read_bytes(), "notes.gguf": b"PK\3\4 no gguf"}})
    with pytest.raises(hub_models.HubError, match="'gemma3' model, an architecture kvstudio cannot run"):
        pulls.pull("org/gemma-GGUF:F32")
    assert gguf_gets(hub, "gemma-F32.gguf") == [f"bytes=0-{gguf_files.HEAD_BYTES - 1}"]  # the head alone
    with pytest.raises(hub_models.HubError, match=r"notes\.gguf is not a GGUF file"):
        pulls.pull("org/gemma-GGUF", file="notes.gguf")
    assert pulls.list_interrupted() == []


def test_the_engine_loads_a_pulled_gguf_by_its_path_and_it_fits_as_its_kept_size(serve_hub, smollm2_gguf):
    from engine import LLM, SamplingParams

    serve_hub({"org/SmolLM2-GGUF": {"SmolLM2-135M-Instruct-Q4_1.gguf": smollm2_gguf.read_bytes()}})
    path = pulls.pull("org/SmolLM2-GGUF")  # its one file: no quantization to name
    [model] = hub_models.list_local_models()
    assert (model.name, model.quant, model.path) == ("org/SmolLM2-GGUF:Q4_1", "Q4_1", path)
    fit = machine.check_model_fits(path, {"kv_cache_memory": 0.02})
    llm = LLM(str(path), max_model_len=64, kv_cache_memory=0.02)
    assert fit.weights == llm.llm_engine.weight_bytes  # what the Models page judged is what the engine holds
    [out] = llm.generate(["The capital of France is"], SamplingParams(max_tokens=4, temperature=0))
    assert len(out.outputs[0].token_ids) == 4
