"""``/metrics`` for ``dsv3 serve`` in the Prometheus text format (``prometheus_client``).

Counted by the server as requests pass:

    dsv3_http_requests_total{code}             every HTTP answer, by status code
    dsv3_prompt_tokens_total                   prompt tokens of accepted generation requests
    dsv3_completion_tokens_total               tokens generated
    dsv3_time_to_first_token_seconds           histogram: request arrival → first token
    dsv3_inter_token_latency_seconds           histogram: between successive tokens of one request

Read from the engine worker's ``stats()`` at each scrape:

    dsv3_requests_running / dsv3_requests_waiting
    dsv3_cache_blocks_used / dsv3_cache_blocks_total
    dsv3_prefix_cache_hit_tokens_total         prompt tokens served from the prefix cache(s)
    dsv3_engine_prompt_tokens_total, dsv3_preemptions_total, dsv3_engine_steps_total
    dsv3_engine_alive                          1 while the engine thread runs

Each app has its own registry, so several servers can live in one process (tests).
"""

from __future__ import annotations

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5)

# stats() key → (metric name, kind, help)
ENGINE_STATS = {
    "running": ("dsv3_requests_running", "gauge", "requests being decoded"),
    "waiting": ("dsv3_requests_waiting", "gauge", "requests waiting for a slot or cache blocks"),
    "blocks_used": ("dsv3_cache_blocks_used", "gauge", "latent-cache blocks in use"),
    "blocks_total": ("dsv3_cache_blocks_total", "gauge", "latent-cache blocks in the pool"),
    "prefix_hit_tokens": ("dsv3_prefix_cache_hit_tokens", "counter",
                          "prompt tokens served from the prefix cache (memory and disk)"),
    "prompt_tokens": ("dsv3_engine_prompt_tokens", "counter", "prompt tokens the engine admitted"),
    "preemptions": ("dsv3_preemptions", "counter", "requests preempted when the cache ran out"),
    "steps": ("dsv3_engine_steps", "counter", "engine steps"),
}


class _EngineCollector:
    """Reads the worker's stats() at scrape time."""

    def __init__(self, worker):
        self.worker = worker

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        try:
            stats = self.worker.stats()
        except Exception:         # a dead engine still answers /metrics
            stats = {}
        for key, (name, kind, help_) in ENGINE_STATS.items():
            value = stats.get(key)
            if value is None:
                continue
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            yield family(name, help_, value=float(value))
        yield GaugeMetricFamily("dsv3_engine_alive", "1 while the engine thread runs",
                                value=1.0 if getattr(self.worker, "alive", True) else 0.0)


class ServerMetrics:
    """The server's metrics in a registry of their own."""

    def __init__(self, worker=None):
        from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics

        disable_created_metrics()             # no *_created series beside every counter

        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("dsv3_http_requests", "HTTP answers by status code", ["code"], registry=r)
        self.prompt_tokens = Counter("dsv3_prompt_tokens", "prompt tokens of accepted requests", registry=r)
        self.completion_tokens = Counter("dsv3_completion_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("dsv3_time_to_first_token_seconds", "request arrival to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("dsv3_inter_token_latency_seconds", "time between successive tokens of a request",
                             buckets=ITL_BUCKETS, registry=r)
        if worker is not None:
            r.register(_EngineCollector(worker))

    def render(self) -> tuple[bytes, str]:
        """(body, content type) for a scrape."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
