"""Prometheus metrics of the endpoint, exposed by the ingress at /metrics.

Everything is recorded in the ingress process (the retriever reports its latency and cache use with each
answer), so one scrape of a replica sees the whole request path. Each ingress keeps its own registry.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  re-exported for the HTTP layer
from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               generate_latest)

# `*_created` series double the exposition and no dashboard of ours reads them.
disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("ragtune_requests", "HTTP requests answered, by route and status code (499: the "
                                "client went away before the answer was complete).",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("ragtune_request_latency_seconds", "Time from request to the last byte of "
                                 "the answer.", ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.retrieval_latency = Histogram("ragtune_retrieval_latency_seconds", "Query embedding and vector "
                                           "search (cache hits included).", buckets=FAST_BUCKETS,
                                           registry=self.registry)
        self.generation_latency = Histogram("ragtune_generation_latency_seconds", "Time spent in the generator.",
                                            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("ragtune_tokens", "Tokens processed, by kind (prompt or completion).", ["kind"],
                              registry=self.registry)
        self.generating = Gauge("ragtune_generations_in_flight", "Answers being generated for this replica's "
                                "requests now (a request whose client went away stops generating).",
                                registry=self.registry)
        self.cache_hits = Counter("ragtune_cache_hits", "Lookups answered from a cache, by cache (embedding or "
                                  "retrieval).", ["cache"], registry=self.registry)
        self.cache_misses = Counter("ragtune_cache_misses", "Lookups a cache could not answer, by cache.",
                                    ["cache"], registry=self.registry)
        self.retrievals = Counter("ragtune_retrieval_decisions", "How requests were routed: retrieved, skipped "
                                  "(and why), or answered 'don't know'.", ["outcome"], registry=self.registry)

    def record_retrieval(self, seconds: float, cache: dict[str, dict[str, int]]) -> None:
        self.retrieval_latency.observe(seconds)
        for name, counts in cache.items():
            if counts.get("hits"):
                self.cache_hits.labels(name).inc(counts["hits"])
            if counts.get("misses"):
                self.cache_misses.labels(name).inc(counts["misses"])

    def record_tokens(self, prompt: int, completion: int) -> None:
        self.tokens.labels("prompt").inc(prompt)
        self.tokens.labels("completion").inc(completion)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
