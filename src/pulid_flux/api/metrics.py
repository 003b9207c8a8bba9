"""Prometheus metrics, read from the queue at scrape time.

Counters live in the queue database, not in this process, so they count the work of every
worker and survive server restarts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from .services import Services


class QueueCollector:
    def __init__(self, svc: Services):
        self.svc = svc

    def collect(self):
        stats = self.svc.queue.stats()
        yield CounterMetricFamily("pulid_flux_requests_submitted", "Requests accepted",
                                  value=stats.get("submitted", 0))
        completed = CounterMetricFamily("pulid_flux_requests_completed", "Requests completed",
                                        labels=["outcome"])
        for outcome in ("ok", "error", "cancelled", "timeout"):
            completed.add_metric([outcome], stats.get(f"completed_{outcome}", 0))
        yield completed
        yield CounterMetricFamily("pulid_flux_requests_requeued",
                                  "Requests run again after a worker was lost",
                                  value=stats.get("requeued", 0))
        states = GaugeMetricFamily("pulid_flux_requests", "Requests by state", labels=["state"])
        for state in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED"):
            states.add_metric([state], stats.get(f"state_{state}", 0))
        yield states
        yield SummaryMetricFamily("pulid_flux_inference_seconds", "Generation time",
                                  count_value=stats.get("inference_count", 0),
                                  sum_value=stats.get("inference_seconds_sum", 0.0))
        yield GaugeMetricFamily("pulid_flux_queue_depth", "Requests waiting for a worker",
                                value=stats.get("state_IN_QUEUE", 0))
        yield GaugeMetricFamily("pulid_flux_requests_in_flight", "Requests being generated",
                                value=stats.get("state_IN_PROGRESS", 0))
        workers = self.svc.queue.workers(self.svc.settings.alive_window_s)
        yield GaugeMetricFamily("pulid_flux_workers_alive", "Workers with a recent heartbeat",
                                value=len(workers))
        gauge = GaugeMetricFamily("pulid_flux_workers", "Live workers by state", labels=["state"])
        for state in ("loading", "ready", "busy"):
            gauge.add_metric([state], sum(1 for w in workers if w.state == state))
        yield gauge


class SupervisorCollector:
    """The local worker supervisor of this server process (``serve``), when it runs one."""

    def __init__(self, supervisor):
        self.supervisor = supervisor

    def collect(self):
        health = self.supervisor.health()
        yield GaugeMetricFamily("pulid_flux_supervisor_up", "1 while the worker supervisor runs",
                                value=int(health["alive"]))
        yield GaugeMetricFamily("pulid_flux_local_workers_running",
                                "Worker processes the supervisor has running",
                                value=health["workers_running"])
        yield CounterMetricFamily("pulid_flux_worker_restarts", "Local worker processes restarted",
                                  value=health["restarts"])
        yield CounterMetricFamily("pulid_flux_supervisor_errors",
                                  "Exceptions the worker supervisor survived",
                                  value=health["errors"])


def render(svc: Services) -> tuple[bytes, str]:
    registry = CollectorRegistry()
    registry.register(QueueCollector(svc))
    if svc.supervisor is not None:
        registry.register(SupervisorCollector(svc.supervisor))
    return generate_latest(registry), "text/plain; version=0.0.4; charset=utf-8"
