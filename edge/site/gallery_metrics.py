"""The shared gallery's counters, and their Prometheus collector on the node's registry."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: What became of each message received (`refused_*`: refused, and why). Every one is
#: exported, zeros included, so that a dashboard's rates exist before the first refusal.
MESSAGE_OUTCOMES = (
    "merged", "unchanged", "views_refused", "duplicate", "echo", "cleared",
    "refused_oversized", "refused_malformed", "refused_schema", "refused_topic",
    "refused_other_model", "refused_not_allowed", "refused_unknown_product",
    "refused_features", "dropped_backlog", "error")
#: What became of each view new to this node in a message accepted.
VIEW_OUTCOMES = ("merged", "damaged", "origin_not_allowed", "capped")


@dataclass(frozen=True, slots=True)
class SharingMetrics:
    messages: Mapping[str, int]  # received, by outcome
    views: Mapping[str, int]  # new views in received messages, by outcome
    published: int
    learned_dropped: int  # this node's learned items not shared: the queue was full
    backlog_bytes: int
    connected: bool
    client: Mapping[str, int] = field(default_factory=dict)  # connects, failures, failovers


class SharingCollector(Collector):
    """Reads the counters at scrape time."""

    def __init__(self, metrics: Callable[[], SharingMetrics]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics()
        messages = CounterMetricFamily(
            "cv_site_gallery_messages", "Shared-gallery messages received, by outcome "
            "(refused_*: refused, and why)", labels=["outcome"])
        for outcome in MESSAGE_OUTCOMES:
            messages.add_metric([outcome], m.messages.get(outcome, 0))
        yield messages
        views = CounterMetricFamily("cv_site_gallery_views", "Views new to this node in "
                                    "shared-gallery messages, by outcome", labels=["outcome"])
        for outcome in VIEW_OUTCOMES:
            views.add_metric([outcome], m.views.get(outcome, 0))
        yield views
        yield CounterMetricFamily("cv_site_gallery_published", "Shared-gallery messages "
                                  "published", value=m.published)
        yield GaugeMetricFamily("cv_site_gallery_backlog_bytes", "Shared-gallery messages "
                                "waiting for the worker", value=m.backlog_bytes)
        yield GaugeMetricFamily("cv_site_gallery_connected", "Connected to the site's broker",
                                value=1.0 if m.connected else 0.0)
