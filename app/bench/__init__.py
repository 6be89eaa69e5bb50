"""Benchmarks: `throughput` (a workload through the engine, and through transformers), `serve` (an OpenAI endpoint
under concurrent streams), `sharing` (KV blocks saved by sharing), `gpu_check` (the GPU path at real sizes)."""
