"""Prometheus text exposition of the server's counters, gauges and latency histograms (`GET /metrics`)."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for le, c in zip(self.buckets, self.counts):
            cumulative += c
            out.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        out += [
            f'{name}_bucket{{le="+Inf"}} {self.count}',
            f"{name}_sum {self.sum:.6f}",
            f"{name}_count {self.count}",
        ]
        return out


class Metrics:
    """Counters keyed by (name, label value); gauges read live from callables when scraped."""

    COUNTERS = {
        "nanoseek_requests_total": ("Finished requests by outcome.", "outcome"),
        "nanoseek_prompt_tokens_total": ("Prompt tokens of finished requests.", None),
        "nanoseek_generation_tokens_total": ("Generated tokens of finished requests.", None),
        "nanoseek_prompt_cache_hit_tokens_total": ("Prompt tokens served from the prefix cache.", None),
    }
    HISTOGRAMS = {
        "nanoseek_time_to_first_token_seconds": "Time from request arrival to its first token.",
        "nanoseek_time_per_output_token_seconds": "Mean time per output token after the first (TPOT).",
    }

    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]]):
        self.gauges = gauges
        self.counters: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.histograms = {name: Histogram() for name in self.HISTOGRAMS}
        self.lock = threading.Lock()

    def inc(self, name: str, value: float = 1, label: str = "") -> None:
        with self.lock:
            self.counters[name][label] += value

    def observe(self, name: str, value: float) -> None:
        with self.lock:
            self.histograms[name].observe(value)

    def render(self) -> str:
        lines = []
        with self.lock:
            for name, (help_, label) in self.COUNTERS.items():
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter"]
                values = self.counters.get(name) or ({} if label else {"": 0.0})
                for key, v in sorted(values.items()):
                    lines.append(f'{name}{{{label}="{key}"}} {v:g}' if label else f"{name} {v:g}")
            for name, help_ in self.HISTOGRAMS.items():
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"] + self.histograms[name].lines(
                    name
                )
        for name, (help_, read) in self.gauges.items():
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {read():g}"]
        return "\n".join(lines) + "\n"
