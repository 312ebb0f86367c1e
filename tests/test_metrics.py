import threading
import urllib.request
from types import SimpleNamespace

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from executor.metrics import (
    FINISH_REASONS,
    ITL_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    TTFT_BUCKETS,
    ServingMetrics,
    build_1_2_5_buckets,
    finish_reason,
    start_metrics_server,
)
from executor.telemetry import TelemetrySampler

# Loopback only, and never through a proxy from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def scrape(server) -> str:
    assert server.url.startswith("http://127.0.0.1:")
    with _opener.open(server.url, timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def lab(engine="0", model="tiny", **extra) -> frozenset:
    return frozenset({"model_name": model, "engine": engine, **extra}.items())


@pytest.fixture
def served():
    m = ServingMetrics("tiny", num_replicas=2)
    server = start_metrics_server(0, registry=m.registry)
    try:
        yield m, server
    finally:
        server.close()


def test_binds_loopback_on_a_free_port(served):
    _, server = served
    assert server.addr == "127.0.0.1" and server.port > 0
    assert server._httpd.socket.getsockname()[:2] == ("127.0.0.1", server.port)


def test_series_exist_before_first_event(served):
    _, server = served
    s = samples(scrape(server))
    for engine in ("0", "1"):
        assert s[("vllm:num_requests_running", lab(engine))] == 0
        assert s[("vllm:prompt_tokens_total", lab(engine))] == 0
        for reason in FINISH_REASONS:
            assert s[("vllm:request_success_total", lab(engine, finished_reason=reason))] == 0


def test_step_and_request_values_exported(served):
    m, server = served
    m.on_step(1, running=3, waiting=5, kv_usage=0.25, prefix_queries=100, prefix_hits=64, preemptions=2,
              prompt_tokens=128, generation_tokens=4, itl=[0.02, 0.03])
    m.on_step(1, running=2, waiting=4, kv_usage=0.5, prefix_queries=10, generation_tokens=2)
    m.on_request_finished(replica=1, status="ok", ttft=0.5, e2e=2.5, queue_time=0.1,
                          prompt_tokens=128, generation_tokens=5)
    m.on_request_finished(replica=1, status="rejected", ttft=None, e2e=float("nan"), queue_time=None,
                          prompt_tokens=64, generation_tokens=0)
    text = scrape(server)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:request_queue_time_seconds_bucket",
                 "vllm:request_time_per_output_token_seconds_bucket", "vllm:iteration_tokens_total_bucket"):
        assert f"{name}{{" in text, name
    s = samples(text)
    one = lab("1")
    assert s[("vllm:num_requests_running", one)] == 2
    assert s[("vllm:num_requests_waiting", one)] == 4
    assert s[("vllm:kv_cache_usage_perc", one)] == 0.5
    assert s[("vllm:prefix_cache_queries_total", one)] == 110
    assert s[("vllm:prefix_cache_hits_total", one)] == 64
    assert s[("vllm:num_preemptions_total", one)] == 2
    assert s[("vllm:prompt_tokens_total", one)] == 128
    assert s[("vllm:generation_tokens_total", one)] == 6
    assert s[("vllm:request_success_total", lab("1", finished_reason="length"))] == 1
    assert s[("vllm:request_success_total", lab("1", finished_reason="abort"))] == 1
    assert s[("vllm:inter_token_latency_seconds_count", one)] == 2
    assert s[("vllm:inter_token_latency_seconds_sum", one)] == pytest.approx(0.05)
    # Exactly one TTFT (the rejected request has none), landing in vLLM's (0.25, 0.5] bucket.
    assert s[("vllm:time_to_first_token_seconds_count", one)] == 1
    assert s[("vllm:time_to_first_token_seconds_bucket", lab("1", le="0.25"))] == 0
    assert s[("vllm:time_to_first_token_seconds_bucket", lab("1", le="0.5"))] == 1
    assert s[("vllm:e2e_request_latency_seconds_sum", one)] == 2.5
    assert s[("vllm:request_queue_time_seconds_sum", one)] == pytest.approx(0.1)
    assert s[("vllm:request_time_per_output_token_seconds_sum", one)] == pytest.approx(0.5)  # (2.5-0.5)/4
    assert s[("vllm:request_prompt_tokens_count", one)] == 1  # rejected: never admitted
    assert s[("vllm:iteration_tokens_total_sum", one)] == 134
    # Replica 0 untouched.
    assert s[("vllm:num_requests_running", lab("0"))] == 0


def test_vllm_bucket_boundaries(served):
    _, server = served
    s = samples(scrape(server))

    def les(name):
        return sorted(float(dict(k)["le"]) for (n, k) in s if n == name + "_bucket" and dict(k)["engine"] == "0")

    inf = float("inf")
    assert les("vllm:time_to_first_token_seconds") == [*TTFT_BUCKETS, inf]
    assert les("vllm:inter_token_latency_seconds") == [*ITL_BUCKETS, inf]
    assert les("vllm:e2e_request_latency_seconds") == [*REQUEST_LATENCY_BUCKETS, inf]
    assert TTFT_BUCKETS[:3] == (0.001, 0.005, 0.01) and TTFT_BUCKETS[-1] == 2560.0
    assert REQUEST_LATENCY_BUCKETS[0] == 0.3 and REQUEST_LATENCY_BUCKETS[-1] == 7680.0


def test_dcgm_gauges_from_telemetry(served):
    m, server = served
    m.on_telemetry({"t": 1.0, "gpu0.util_pct": 87.0, "gpu0.mem_used_mib": 3072.0, "gpu0.mem_total_mib": 81920.0,
                    "gpu0.power_w": 312.5, "gpu0.temp_c": 61.0, "gpu0.mem_util_pct": 40.0,
                    "gpu1.util_pct": float("nan"), "replica0.waiting": 3.0})
    s = samples(scrape(server))
    g0 = frozenset({"gpu": "0"}.items())
    assert s[("DCGM_FI_DEV_GPU_UTIL", g0)] == 87.0
    assert s[("DCGM_FI_DEV_FB_USED", g0)] == 3072.0
    assert s[("DCGM_FI_DEV_POWER_USAGE", g0)] == 312.5
    assert s[("DCGM_FI_DEV_GPU_TEMP", g0)] == 61.0
    assert s[("DCGM_FI_DEV_MEM_COPY_UTIL", g0)] == 40.0
    assert ("DCGM_FI_DEV_GPU_UTIL", frozenset({"gpu": "1"}.items())) not in s  # NaN: left unset


def test_sampler_feeds_metrics_live(served):
    m, server = served
    fed = threading.Event()
    gpu_like = [lambda: {"gpu2.util_pct": 55.0}]  # stands in for NVML columns
    with TelemetrySampler(0.01, gpu_like, listeners=[m.on_telemetry, lambda _: fed.set()], gpu=False):
        assert fed.wait(10)
    assert samples(scrape(server))[("DCGM_FI_DEV_GPU_UTIL", frozenset({"gpu": "2"}.items()))] == 55.0


def test_on_sequence_finished():
    m = ServingMetrics("tiny")
    seq = SimpleNamespace(replica=0, outcome="ok", t_arrival=10.0, t_admitted=10.2, t_first_token=10.7,
                          t_finish=12.7, num_generated=3, req=SimpleNamespace(input_tokens=40))
    m.on_sequence_finished(seq)
    s = samples(prometheus_client.generate_latest(m.registry).decode())
    assert s[("vllm:time_to_first_token_seconds_sum", lab())] == pytest.approx(0.7)
    assert s[("vllm:e2e_request_latency_seconds_sum", lab())] == pytest.approx(2.7)
    assert s[("vllm:request_queue_time_seconds_sum", lab())] == pytest.approx(0.2)
    assert s[("vllm:request_time_per_output_token_seconds_sum", lab())] == pytest.approx(1.0)


def test_own_registries_do_not_clash():
    a, b = ServingMetrics("a"), ServingMetrics("b")
    a.on_step(0, running=1, waiting=0, kv_usage=0.1)
    sa = samples(prometheus_client.generate_latest(a.registry).decode())
    sb = samples(prometheus_client.generate_latest(b.registry).decode())
    assert sa[("vllm:num_requests_running", lab(model="a"))] == 1
    assert sb[("vllm:num_requests_running", lab(model="b"))] == 0
    default = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "vllm:" not in default and "DCGM_" not in default


def test_finish_reasons_and_buckets():
    assert finish_reason("ok") == "length"
    assert finish_reason("rejected") == finish_reason("timed_out") == "abort"
    assert finish_reason("failed") == "error"
    assert finish_reason("stop") == "stop"
    with pytest.raises(ValueError):
        finish_reason("lost")
    assert build_1_2_5_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    assert build_1_2_5_buckets(4096)[-1] == 2000


def test_server_close_frees_port():
    m = ServingMetrics()
    with start_metrics_server(0, registry=m.registry) as server:
        port = server.port
        assert "vllm:num_requests_running" in scrape(server)
    with pytest.raises(OSError):
        _opener.open(f"http://127.0.0.1:{port}/metrics", timeout=2)
