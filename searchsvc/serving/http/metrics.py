"""Prometheus metrics of one API process (its own registry: no module-level state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from searchsvc.serving.search import QueryResponse

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_STAGES = ("decode_embed", "vector_search", "rerank", "total")


def reason_label(reason: str) -> str:
    """A fallback reason as a bounded label: the text before any detail (``reranker
    failed: <message>`` -> ``reranker failed``; a timeout keeps its seconds)."""
    return reason.split(":", 1)[0].strip()[:60] or "unknown"


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "searchsvc_http_requests", "HTTP requests answered", ["route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "searchsvc_http_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "searchsvc_http_in_flight_requests", "Requests being worked on", registry=r
        )
        self.stage_seconds = Histogram(
            "searchsvc_query_stage_seconds",
            "Query latency per stage",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queries = Counter("searchsvc_queries", "Queries answered", ["reranked"], registry=r)
        self.rerank_fallbacks = Counter(
            "searchsvc_rerank_fallbacks",
            "Queries answered by the first stage, by reason",
            ["reason"],
            registry=r,
        )
        self.model_version = Gauge(
            "searchsvc_serving_model_version",
            "Model version id that served the last query (0: none)",
            ["kind"],
            registry=r,
        )
        self.ingest_images = Counter(
            "searchsvc_ingest_images",
            "Images handled by ingests run through the API, by outcome",
            ["outcome"],
            registry=r,
        )

    def observe_query(self, response: QueryResponse) -> None:
        for stage in _STAGES:
            if stage in response.timings_ms:
                self.stage_seconds.labels(stage).observe(response.timings_ms[stage] / 1000)
        self.queries.labels("true" if response.reranked else "false").inc()
        if not response.reranked and response.rerank_reason:
            self.rerank_fallbacks.labels(reason_label(response.rerank_reason)).inc()
        self.model_version.labels("embedder").set(response.embedder_version)
        reranker = response.reranker or ""
        self.model_version.labels("reranker").set(
            int(reranker.removeprefix("stir-v")) if reranker.startswith("stir-v") else 0
        )

    def observe_ingest(self, counts: dict[str, int | float]) -> None:
        for outcome in ("embedded", "unchanged", "failed", "removed"):
            value = counts.get(f"images_{outcome}", 0)
            if value:
                self.ingest_images.labels(outcome).inc(value)
