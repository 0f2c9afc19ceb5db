"""The pipeline's own figures, for observability's metrics: each forward pass observed, and the serving cache and
images in flight read at every scrape."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from classifier.inference.batching import BatchStats
from classifier.inference.cache import ResultCache
from classifier.observability import (BATCH_SIZE, BEHIND_JOB, DEADLINE_EXCEEDED, IN_FLIGHT, INFERENCE, JOB_BATCH_SIZE,
                                      QUEUE_WAIT)

# The service being served (watch): its cache and its count of images in flight.
_watched: list[tuple[ResultCache | None, Callable[[], int]]] = []
IN_FLIGHT.set_function(lambda: _watched[-1][1]() if _watched else 0)


class CacheMetrics:
    """cache_hits_total, cache_misses_total, cache_evictions_total and cache_entries, read from the serving cache
    itself at each scrape (all 0 with the cache off)."""

    def collect(self) -> Iterator[Metric]:
        cache = _watched[-1][0] if _watched else None
        yield CounterMetricFamily("cache_hits", "Images answered from the cache", value=cache.hits if cache is not None else 0)
        yield CounterMetricFamily("cache_misses", "Images looked up in the cache and computed",
                                  value=cache.misses if cache is not None else 0)
        yield CounterMetricFamily("cache_evictions", "Answers dropped from the cache, least recently used first (CACHE_ENTRIES)",
                                  value=cache.evictions if cache is not None else 0)
        yield GaugeMetricFamily("cache_entries", "Answers in the cache", value=len(cache) if cache is not None else 0)


REGISTRY.register(CacheMetrics())


def watch(cache: ResultCache | None, in_flight: Callable[[], int]) -> Callable[[], None]:
    """Read the cache and the images in flight of this service from now on (a process serves one service; tests
    build several, one after another). Returns what puts back those read before."""
    entry = (cache, in_flight)
    _watched.append(entry)
    return lambda: _watched.remove(entry)


def observe_batch(stats: BatchStats) -> None:
    BATCH_SIZE.observe(stats.size)
    INFERENCE.observe(stats.inference_s)
    if stats.background:
        JOB_BATCH_SIZE.observe(stats.size)
    else:  # job images wait for idle capacity by design; the histograms are the online path's
        for wait in stats.queue_wait_s:
            QUEUE_WAIT.observe(wait)
        for wait in stats.behind_job_s:
            BEHIND_JOB.observe(wait)


def deadline_passed(stage: str, images: int = 1) -> None:
    """Images dropped because their caller's deadline passed, at this stage of the pipeline."""
    DEADLINE_EXCEEDED.labels(stage).inc(images)
