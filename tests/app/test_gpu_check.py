"""`make gpu-check` runs once on a borrowed GPU, so its script is run here first at smoke scale: the same code on
the CPU, tiny shapes, Triton's interpreter. Every check must report, and the correctness checks must pass."""

from __future__ import annotations

from app.bench import gpu_check


def test_the_gpu_check_script_runs_every_check_at_smoke_scale(capsys):
    assert gpu_check.main(["--smoke", "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("check ") :]
    for check in (
        "decode attention float32 (splits=1)",
        "decode attention float32 (splits=4)",
        "prefill attention float32",
        "reshape_and_cache fp8",
        "copy_blocks",
        "decode attention, fp8",
        "rms_norm + residual",
        "rotary (neox)",
        "rotary (gpt-j)",
        "greedy agreement with transformers",
        "CUDA graphs on vs off",
        "prompt logprobs vs transformers (float32)",
        "prompt logprobs, weights kept int8",
        "ngram speculation vs none (W64 greedy, float32)",
    ):
        line = next(line for line in table.splitlines() if line.startswith(check))
        assert "PASS" in line, line
    for check in (
        "decode attention bandwidth",
        "kvstudio tok/s",
        "hf generate tok/s",
        "fp8 KV cache vs 16-bit",
        "weights kept int8",
        "weights kept int4",
    ):
        assert any(line.startswith(check) for line in table.splitlines()), check


def test_without_a_gpu_the_real_check_says_so(capsys, monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().out
