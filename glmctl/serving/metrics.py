"""Prometheus text-format metrics of ``glmctl serve`` (GET /metrics), thread-safe.

    glmctl_serve_requests_total{endpoint,status}      counter: every answered request
    glmctl_serve_prompt_tokens_total                  counter: prompt tokens of accepted requests
    glmctl_serve_completion_tokens_total              counter: tokens generated (cancelled jobs too)
    glmctl_serve_cancelled_total                      counter: jobs cancelled (client gone, timeout)
    glmctl_serve_queue_depth, glmctl_serve_batch_size gauges: waiting jobs, jobs in the batch
    glmctl_serve_time_to_first_token_seconds          histogram: arrival -> first generated token
    glmctl_serve_time_per_output_token_seconds        histogram: between consecutive tokens

A job is one prompt x one choice; beam search produces its tokens at the end of each blank and
adds no latency samples.
"""
from __future__ import annotations

import bisect
import threading

BUCKETS = {
    "ttft": (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    "tpot": (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
}
NAMES = {"ttft": ("glmctl_serve_time_to_first_token_seconds", "Time from arrival to the first generated token."),
         "tpot": ("glmctl_serve_time_per_output_token_seconds", "Time between consecutive generated tokens.")}


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cancelled = 0
        self.gauges = {"queue_depth": 0, "batch_size": 0}
        self.hist = {k: ([0] * (len(b) + 1), [0.0]) for k, b in BUCKETS.items()}

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            key = (endpoint, int(status))
            self.requests[key] = self.requests.get(key, 0) + 1

    def tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def cancel(self, jobs: int) -> None:
        with self._lock:
            self.cancelled += jobs

    def set_gauges(self, **values) -> None:
        with self._lock:
            self.gauges.update(values)

    def observe(self, name: str, seconds: float) -> None:
        with self._lock:
            counts, total = self.hist[name]
            counts[bisect.bisect_left(BUCKETS[name], seconds)] += 1
            total[0] += seconds

    def render(self) -> str:
        with self._lock:
            out = ["# HELP glmctl_serve_requests_total Requests answered, by endpoint and HTTP status.",
                   "# TYPE glmctl_serve_requests_total counter"]
            for (ep, st), n in sorted(self.requests.items()):
                out.append(f'glmctl_serve_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
            for name, v, what in (("prompt_tokens", self.prompt_tokens, "Prompt tokens of accepted requests."),
                                  ("completion_tokens", self.completion_tokens, "Tokens generated."),
                                  ("cancelled", self.cancelled, "Jobs cancelled (the client left or timed out).")):
                out += [f"# HELP glmctl_serve_{name}_total {what}", f"# TYPE glmctl_serve_{name}_total counter",
                        f"glmctl_serve_{name}_total {v}"]
            for name, what in (("queue_depth", "Requests waiting for a batch slot."),
                               ("batch_size", "Requests in the running batch.")):
                out += [f"# HELP glmctl_serve_{name} {what}", f"# TYPE glmctl_serve_{name} gauge",
                        f"glmctl_serve_{name} {self.gauges[name]}"]
            for key, (metric, what) in NAMES.items():
                counts, total = self.hist[key]
                out += [f"# HELP {metric} {what}", f"# TYPE {metric} histogram"]
                cum = 0
                for le, c in zip(BUCKETS[key], counts):
                    cum += c
                    out.append(f'{metric}_bucket{{le="{le}"}} {cum}')
                cum += counts[-1]
                out += [f'{metric}_bucket{{le="+Inf"}} {cum}', f"{metric}_sum {total[0]:.6f}", f"{metric}_count {cum}"]
            return "\n".join(out) + "\n"
