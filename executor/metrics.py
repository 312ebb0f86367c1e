"""Live Prometheus metrics under vLLM's and DCGM's names, for watching a run as it goes.

The histograms here use vLLM's bucket boundaries and exist for live dashboards
only: twinfer's reports compute TTFT/TPOT/ITL/E2E percentiles from the exact
per-request records (traces.records), never from these buckets.

Names, types and labels follow vLLM v1 (vllm/v1/metrics/loggers.py):
every serving metric carries `model_name` and `engine`, where `engine` is the
replica index (vLLM's data-parallel engine index label). Counters are declared
without the `_total` suffix, as vLLM does; the exposition adds it
(`vllm:prompt_tokens_total`). GPU gauges follow the DCGM exporter
(DCGM_FI_DEV_GPU_UTIL %, DCGM_FI_DEV_FB_USED MiB, DCGM_FI_DEV_POWER_USAGE W,
DCGM_FI_DEV_GPU_TEMP C, DCGM_FI_DEV_MEM_COPY_UTIL %) with label `gpu`.

Each ServingMetrics owns its CollectorRegistry, so several runs (and tests) in one
process never clash and the global default registry is left alone. The HTTP
endpoint is opt-in and binds to loopback unless told otherwise:

    metrics = ServingMetrics("llama-1b", num_replicas=2)
    server = start_metrics_server(9400, registry=metrics.registry)   # port=0: any free port
    ...
    server.close()
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import socket
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, make_wsgi_app

log = logging.getLogger(__name__)

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                           60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

# vLLM's finish reasons (vllm/v1/engine/__init__.py FINISH_REASON_STRINGS).
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
# twinfer status -> vLLM finished_reason. A replayed request stops at the trace's output
# length, which is vLLM's "length" (max_tokens consumed).
STATUS_TO_FINISH_REASON = {"ok": "length", "rejected": "abort", "timed_out": "abort", "failed": "error"}

# DCGM exporter field -> telemetry column suffix (executor.telemetry gpu{i}.<suffix>).
DCGM_GAUGES = {
    "DCGM_FI_DEV_GPU_UTIL": ("util_pct", "GPU utilization (in %)."),
    "DCGM_FI_DEV_MEM_COPY_UTIL": ("mem_util_pct", "Memory utilization (in %)."),
    "DCGM_FI_DEV_FB_USED": ("mem_used_mib", "Framebuffer memory used (in MiB)."),
    "DCGM_FI_DEV_POWER_USAGE": ("power_w", "Power draw (in W)."),
    "DCGM_FI_DEV_GPU_TEMP": ("temp_c", "GPU temperature (in C)."),
}
_GPU_COLUMN = re.compile(r"^gpu(\d+)\.(\w+)$")
_SUFFIX_TO_DCGM = {suffix: name for name, (suffix, _) in DCGM_GAUGES.items()}

LABELS = ("model_name", "engine")


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to max_value."""
    out: list[int] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


def finish_reason(status: str) -> str:
    """vLLM finished_reason for a twinfer status (vLLM reasons pass through)."""
    if status in FINISH_REASONS:
        return status
    try:
        return STATUS_TO_FINISH_REASON[status]
    except KeyError:
        raise ValueError(f"unknown request status {status!r}") from None


def _ok(x: float | None) -> bool:
    return x is not None and not math.isnan(x)


class ServingMetrics:
    """The engine's live metrics. Thread-safe (prometheus_client metrics are).

    Engine calls:
      on_step(...)              after each replica step: gauges, token/prefix/preemption counters, ITL
      on_request_finished(...)  once per terminal request (also rejected/timed-out/failed ones)
      on_sequence_finished(seq) the same, read from a policies.sequence.Sequence
      on_gpu_sample(...)        DCGM-style GPU gauges
      on_telemetry(sample)      a TelemetrySampler listener: forwards its gpu{i}.* columns
    """

    def __init__(self, model_name: str = "twinfer", num_replicas: int = 1, *, max_model_len: int = 32768,
                 registry: CollectorRegistry | None = None, process_metrics: bool = True):
        self.model_name = model_name
        self.registry = CollectorRegistry() if registry is None else registry
        r = self.registry
        if process_metrics:
            ProcessCollector(registry=r)  # standard process_cpu_seconds_total, process_resident_memory_bytes, ...

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, LABELS, registry=r)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, LABELS + extra, registry=r)

        def hist(name: str, doc: str, buckets: Iterable[float]) -> Histogram:
            return Histogram(name, doc, LABELS, buckets=tuple(buckets), registry=r)

        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.prefix_queries = counter("vllm:prefix_cache_queries",
                                      "Prefix cache queries, in terms of number of queried tokens.")
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.")
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.request_success = counter("vllm:request_success", "Count of successfully processed requests.",
                                       ("finished_reason",))
        self.iteration_tokens = hist("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
                                     ITERATION_TOKENS_BUCKETS)
        self.ttft = hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                         TTFT_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                        ITL_BUCKETS)
        self.tpot = hist("vllm:request_time_per_output_token_seconds",
                         "Histogram of time_per_output_token_seconds per request.", ITL_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                        REQUEST_LATENCY_BUCKETS)
        self.queue_time = hist("vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS)
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                          token_buckets)
        self.request_generation_tokens = hist("vllm:request_generation_tokens",
                                              "Number of generation tokens processed.", token_buckets)
        self.gpu = {name: Gauge(name, doc, ("gpu",), registry=r) for name, (_, doc) in DCGM_GAUGES.items()}

        # Like vLLM, create every engine's series up front so they read 0 before the first event.
        for i in range(num_replicas):
            self._touch(i)

    def _labels(self, replica: int) -> tuple[str, str]:
        return (self.model_name, str(replica))

    def _touch(self, replica: int) -> None:
        lv = self._labels(replica)
        for m in (self.running, self.waiting, self.kv_usage, self.prefix_queries, self.prefix_hits,
                  self.preemptions, self.prompt_tokens, self.generation_tokens, self.iteration_tokens,
                  self.ttft, self.itl, self.tpot, self.e2e, self.queue_time, self.request_prompt_tokens,
                  self.request_generation_tokens):
            m.labels(*lv)
        for reason in FINISH_REASONS:
            self.request_success.labels(*lv, reason)

    def on_step(self, replica: int, running: int, waiting: int, kv_usage: float, *, prefix_queries: int = 0,
                prefix_hits: int = 0, preemptions: int = 0, prompt_tokens: int = 0, generation_tokens: int = 0,
                itl: Iterable[float] = ()) -> None:
        """After one step of one replica.

        running, waiting: queue lengths now; kv_usage: fraction of KV blocks in use (0..1).
        The rest are this step's increments: prefix_queries / prefix_hits in tokens (prompt
        tokens looked up / found in the prefix cache), requests preempted, prompt_tokens
        (vLLM's meaning: the full prompt length of each request whose prefill completed this
        step, cached tokens included), generation_tokens (tokens sampled this step), and
        itl: the gap since the previous token for each decode token produced this step.
        """
        lv = self._labels(replica)
        self.running.labels(*lv).set(running)
        self.waiting.labels(*lv).set(waiting)
        self.kv_usage.labels(*lv).set(kv_usage)
        if prefix_queries:
            self.prefix_queries.labels(*lv).inc(prefix_queries)
        if prefix_hits:
            self.prefix_hits.labels(*lv).inc(prefix_hits)
        if preemptions:
            self.preemptions.labels(*lv).inc(preemptions)
        if prompt_tokens:
            self.prompt_tokens.labels(*lv).inc(prompt_tokens)
        if generation_tokens:
            self.generation_tokens.labels(*lv).inc(generation_tokens)
        if prompt_tokens or generation_tokens:
            self.iteration_tokens.labels(*lv).observe(prompt_tokens + generation_tokens)
        h = self.itl.labels(*lv)
        for gap in itl:
            h.observe(gap)

    def on_request_finished(self, *, replica: int, status: str, ttft: float | None, e2e: float | None,
                            queue_time: float | None, prompt_tokens: int, generation_tokens: int) -> None:
        """One terminal request. Times in seconds per DESIGN (from the intended send time);
        None/NaN for times it never reached (a rejected request has no TTFT). `status` is a
        twinfer status (ok, rejected, timed_out, failed) or a vLLM finish reason.
        replica -1 (never reached a replica) is exported as engine="-1"."""
        reason = finish_reason(status)
        lv = self._labels(replica)
        self.request_success.labels(*lv, reason).inc()
        if _ok(ttft):
            self.ttft.labels(*lv).observe(ttft)  # type: ignore[arg-type]
        if _ok(e2e):
            self.e2e.labels(*lv).observe(e2e)  # type: ignore[arg-type]
            if _ok(ttft) and generation_tokens > 1:
                self.tpot.labels(*lv).observe((e2e - ttft) / (generation_tokens - 1))  # type: ignore[operator]
        if _ok(queue_time):  # admitted: its prompt reached a replica
            self.queue_time.labels(*lv).observe(queue_time)  # type: ignore[arg-type]
            self.request_prompt_tokens.labels(*lv).observe(prompt_tokens)
            self.request_generation_tokens.labels(*lv).observe(generation_tokens)

    def on_sequence_finished(self, seq: Any) -> None:
        """on_request_finished from a terminal policies.sequence.Sequence (duck-typed)."""
        def since_arrival(t: float | None) -> float | None:
            return None if t is None else t - seq.t_arrival

        self.on_request_finished(
            replica=seq.replica, status=seq.outcome, ttft=since_arrival(seq.t_first_token),
            e2e=since_arrival(seq.t_finish), queue_time=since_arrival(seq.t_admitted),
            prompt_tokens=seq.req.input_tokens, generation_tokens=seq.num_generated)

    def on_gpu_sample(self, gpu: int, *, util_pct: float | None = None, mem_util_pct: float | None = None,
                      mem_used_mib: float | None = None, power_w: float | None = None,
                      temp_c: float | None = None) -> None:
        """DCGM-style gauges for one GPU; None/NaN leaves a gauge as it was."""
        values = {"util_pct": util_pct, "mem_util_pct": mem_util_pct, "mem_used_mib": mem_used_mib,
                  "power_w": power_w, "temp_c": temp_c}
        for suffix, v in values.items():
            if _ok(v):
                self.gpu[_SUFFIX_TO_DCGM[suffix]].labels(str(gpu)).set(v)  # type: ignore[arg-type]

    def on_telemetry(self, sample: Mapping[str, float]) -> None:
        """TelemetrySampler listener: forwards the gpu{i}.* columns to the DCGM gauges."""
        per_gpu: dict[int, dict[str, float]] = {}
        for key, v in sample.items():
            m = _GPU_COLUMN.match(key)
            if m and m.group(2) in _SUFFIX_TO_DCGM:
                per_gpu.setdefault(int(m.group(1)), {})[m.group(2)] = v
        for gpu, vals in per_gpu.items():
            self.on_gpu_sample(gpu, **vals)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _SilentHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class MetricsServer:
    """A running /metrics endpoint; close() stops it."""

    addr: str
    port: int
    _httpd: WSGIServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5.0)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_metrics_server(port: int, addr: str = "127.0.0.1", *, registry: CollectorRegistry) -> MetricsServer:
    """Serve `registry` at http://addr:port/metrics on a daemon thread.

    Loopback by default: pass addr="0.0.0.0" deliberately to expose it. port=0 picks a
    free port; the returned server's .port is the one actually bound.
    """
    family, _, _, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    server_cls = type("_MetricsHTTPServer", (_ThreadingWSGIServer,), {"address_family": family})
    httpd = make_server(sockaddr[0], port, make_wsgi_app(registry), server_cls, handler_class=_SilentHandler)
    # A short poll interval so close() returns in ~50 ms instead of the default 0.5 s.
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              name="twinfer-metrics", daemon=True)
    thread.start()
    host, bound_port = httpd.server_address[:2]
    if not ipaddress.ip_address(host).is_loopback:
        log.warning("metrics endpoint listening on %s:%d, reachable from other machines", host, bound_port)
    return MetricsServer(addr=str(host), port=int(bound_port), _httpd=httpd, _thread=thread)
