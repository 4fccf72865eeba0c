"""Prometheus metrics of a running server, read from the engine at scrape time.

Names follow vLLM's where one exists (``vllm:`` becomes ``fastadapters:``): running / waiting
requests, prompt and generation token counters, finished requests by reason, KV-block usage,
and ``lora_requests_info`` -- a gauge whose labels list the adapters with running and with waiting
requests (comma-separated, vLLM's ``running_lora_adapters`` / ``waiting_lora_adapters``) and the
number loaded (``max_lora``), valued at the scrape's Unix time. ``fastadapters:http_requests_total``
counts HTTP requests by endpoint and status code (the server increments it).
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["ServerMetrics"]

P = "fastadapters:"


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        snap = self.engine.snapshot()
        stats = snap["stats"]
        yield GaugeMetricFamily(P + "num_requests_running", "Requests in the running batch.", value=snap["running"])
        yield GaugeMetricFamily(P + "num_requests_waiting", "Requests queued, not yet running.", value=snap["waiting"])
        yield CounterMetricFamily(P + "prompt_tokens", "Prompt tokens prefilled.", value=stats.get("prompt_tokens", 0))
        yield CounterMetricFamily(P + "generation_tokens", "Tokens generated.",
                                  value=stats.get("generation_tokens", 0))
        done = CounterMetricFamily(P + "request_success", "Finished requests by finish reason.",
                                   labels=["finished_reason"])
        for reason in ("stop", "length", "abort", "error"):
            done.add_metric([reason], stats.get(f"finished_{reason}", 0))
        yield done
        pool = self.engine.pool
        yield GaugeMetricFamily(P + "kv_cache_usage_perc", "Fraction of KV blocks in use.",
                                value=snap["used_blocks"] / pool.num_blocks)
        info = GaugeMetricFamily(P + "lora_requests_info", "Adapters with running and waiting requests.",
                                 labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        info.add_metric([",".join(snap["running_adapters"]), ",".join(snap["waiting_adapters"]),
                         str(len(self.engine.adapters()))], time.time())
        yield info


class ServerMetrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.http = Counter(P + "http_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"],
                            registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
