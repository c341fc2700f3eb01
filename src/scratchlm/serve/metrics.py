"""Server metrics in the Prometheus text format (version 0.0.4), with no client library.

Three kinds are enough: a counter only goes up, a gauge is set to the current value, and a histogram
counts observations into cumulative buckets (``le`` = "less than or equal") plus their sum and count, which
is what Prometheus' ``histogram_quantile`` reads. Every update takes one lock: the engine thread and the
event loop both record.
"""

from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    # Label values escape backslash, double quote and newline (exposition format spec).
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped)) + "}"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class Counter:
    """A monotonically increasing count, optionally split by labels."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, labels
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def samples(self) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in sorted(self.values.items())]


class Gauge(Counter):
    """A value that goes up and down (queue depth, batch size)."""

    kind = "gauge"

    def set(self, value: float) -> None:
        self.values[()] = value


class Histogram:
    """Observations counted into cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def samples(self) -> list[str]:
        lines, total = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts):
            total += count
            le = "+Inf" if bound == float("inf") else _number(bound)
            lines.append(f'{self.name}_bucket{{le="{le}"}} {total}')
        lines += [f"{self.name}_sum {_number(self.sum)}", f"{self.name}_count {total}"]
        return lines


class ServerMetrics:
    """Every metric the server exports; ``render()`` gives the ``/metrics`` page."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = Counter("scratchlm_requests_total", "HTTP requests answered, by route and status",
                                ("route", "status"))
        self.prompt_tokens = Counter("scratchlm_prompt_tokens_total", "Prompt tokens processed")
        self.completion_tokens = Counter("scratchlm_completion_tokens_total", "Completion tokens generated")
        self.reused_tokens = Counter("scratchlm_prefix_reused_tokens_total",
                                     "Prompt tokens whose keys and values were copied from another request")
        self.ttft = Histogram("scratchlm_time_to_first_token_seconds",
                              "Time from a request's arrival to its first generated token", LATENCY_BUCKETS)
        self.itl = Histogram("scratchlm_inter_token_latency_seconds",
                             "Time between consecutive tokens of one request", LATENCY_BUCKETS)
        self.queue_depth = Gauge("scratchlm_queue_depth", "Requests waiting for a batch slot")
        self.active = Gauge("scratchlm_active_requests", "Requests holding a batch slot")
        self.batch_size = Gauge("scratchlm_batch_size", "Requests in the most recent decode step")
        self.batch_sizes = Histogram("scratchlm_decode_batch_size", "Requests per decode step", BATCH_BUCKETS)
        # Speculative decoding (--draft): acceptance rate = accepted / drafted; tokens per forward pass of a request
        # = verify_tokens / verify_passes (docs/decoding.md).
        self.draft_tokens = Counter("scratchlm_draft_tokens_total", "Tokens proposed by the drafter (--draft)")
        self.accepted_tokens = Counter("scratchlm_draft_accepted_tokens_total", "Drafted tokens the model accepted")
        self.verify_passes = Counter("scratchlm_speculative_passes_total",
                                     "Request rows in speculative forward passes (one per request per pass)")
        self.verify_tokens = Counter("scratchlm_speculative_tokens_total",
                                     "Tokens those rows produced (accepted drafts and one more each)")
        self._all = [self.requests, self.prompt_tokens, self.completion_tokens, self.reused_tokens, self.ttft, self.itl,
                     self.queue_depth, self.active, self.batch_size, self.batch_sizes, self.draft_tokens,
                     self.accepted_tokens, self.verify_passes, self.verify_tokens]

    def record(self, fn, *args) -> None:
        """Call ``fn(*args)`` (a metric's update method) under the lock."""
        with self._lock:
            fn(*args)

    def render(self) -> str:
        with self._lock:
            lines = []
            for m in self._all:
                lines += [f"# HELP {m.name} {m.help}", f"# TYPE {m.name} {m.kind}", *m.samples()]
        return "\n".join(lines) + "\n"
