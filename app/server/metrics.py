"""GET /metrics: Prometheus text from the engine's latest stats snapshot, the server's own request counts and its
latency histograms.

Each server owns its registry (no process-global collectors), so several servers or tests never collide.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from app.engine_thread import EngineSnapshot

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


@dataclass
class RequestCounts:
    """This server's engine requests (one per prompt) that have not ended, counted where the server sees them: the
    engine's stats count sequences, and the desktop window's requests share the engine. Event loop only."""

    waiting: int = 0  # queued or in prefill: no output yet
    running: int = 0  # generating: past their first output


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.snapshot: EngineSnapshot | None = None
        self.requests = RequestCounts()
        self.ttft = Histogram(
            "kvstudio_time_to_first_token_seconds",
            "Time from request to its first token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "kvstudio_inter_token_latency_seconds",
            "Time between a request's output steps",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(self)

    def update(self, snapshot: EngineSnapshot) -> None:
        """An EngineThread listener: keep the newest snapshot (called on the engine thread)."""
        self.snapshot = snapshot

    def collect(self):
        """Called by the registry on each scrape: the request counts, then engine figures from the newest
        snapshot."""
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric([self.model_name], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric([self.model_name], value)
            return c

        yield gauge(
            "kvstudio_num_requests_running",
            "This server's requests generating (past their first token; one per prompt)",
            self.requests.running,
        )
        yield gauge(
            "kvstudio_num_requests_waiting",
            "This server's requests queued or in prefill (no token yet; one per prompt)",
            self.requests.waiting,
        )
        if self.snapshot is None:
            return
        s = self.snapshot.stats
        yield gauge(
            "kvstudio_num_sequences_running",
            "Sequences the engine runs, for every caller (a request with n samples or beams has several)",
            s.num_running,
        )
        yield gauge("kvstudio_num_sequences_swapped", "Sequences swapped out to host memory", s.num_swapped)
        yield gauge("kvstudio_kv_cache_usage_perc", "Fraction of KV blocks in use", s.kv_usage)
        yield gauge("kvstudio_kv_blocks_shared", "KV blocks held by more than one sequence", s.num_blocks_shared)
        yield counter(
            "kvstudio_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", s.prefix_cache_queries
        )
        yield counter("kvstudio_prefix_cache_hits", "Prompt tokens served by the prefix cache", s.prefix_cache_hits)
        yield counter("kvstudio_num_preemptions", "Preemptions", s.num_preemptions)
        yield counter("kvstudio_prompt_tokens", "Prompt tokens computed", s.prompt_tokens_total)
        yield counter("kvstudio_generation_tokens", "Tokens generated", s.generation_tokens_total)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
