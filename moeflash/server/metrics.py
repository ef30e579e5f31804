"""Prometheus metrics under the `moeflash:` prefix, named as vLLM names them where they overlap.

Latencies are observed by the HTTP layer per request (time to first token, time between tokens,
end to end); engine gauges and counters come from the snapshot the engine loop publishes after
each step (a scrape never waits for a step); per-step MoE figures (distinct routed experts read per token) are observed by the engine
loop's step callback. Each server gets its own registry, so several servers in one process (tests)
do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                    10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class _EngineCollector:
    """Gauges and counters read from `stats()` (AsyncLLMEngine.stats) at each scrape."""

    def __init__(self, stats, model_name: str, limits: dict[str, float] | None = None):
        self.stats, self.model_name, self.limits = stats, model_name, dict(limits or {})

    def collect(self):
        s = self.stats()
        labels = ["model_name"]
        for name, doc, key in (("num_requests_running", "Requests holding state and being advanced.", "running"),
                               ("num_requests_waiting", "Requests queued for admission.", "waiting"),
                               ("num_sequences_queued", "Sequences accepted and not yet running (counted "
                                "against the max_waiting_sequences limit).", "queued"),
                               ("state_memory_bytes", "Bytes of sequence state (KV / compressed "
                                "entries) held by running requests.", "state_bytes")):
            g = GaugeMetricFamily(f"moeflash:{name}", doc, labels=labels)
            g.add_metric([self.model_name], float(s[key]))
            yield g
        for name, doc, key in (("prompt_tokens", "Prompt tokens prefilled.", "prompt_tokens"),
                               ("generation_tokens", "Tokens generated.", "generated_tokens"),
                               ("routed_experts_read", "Distinct routed experts read, summed over "
                                "layers and steps.", "routed_experts_read"),
                               ("forward_tokens", "Tokens run through the model.", "forward_tokens"),
                               ("requests_rejected", "Requests refused with 429 (waiting queue full).",
                                "rejected"),
                               ("preemptions", "Sequences recomputed after a failed forward call.",
                                "preemptions"),
                               ("requests_failed", "Sequences that failed alone (finish_reason error).",
                                "failed_requests"),
                               ("prompt_tokens_shared", "Prompt tokens not prefilled again because a "
                                "choice copied the state of another with the same prompt (n > 1).",
                                "prompt_tokens_shared")):
            c = CounterMetricFamily(f"moeflash:{name}", doc, labels=labels)
            c.add_metric([self.model_name], float(s[key]))
            yield c
        if self.limits:
            g = GaugeMetricFamily("moeflash:limit", "Admission limits this server enforces (0: none).",
                                  labels=labels + ["limit"])
            for name, value in sorted(self.limits.items()):
                g.add_metric([self.model_name, name], float(value))
            yield g
        cache = s.get("prefix_cache")
        if cache is not None:
            for name, doc, key in (("prefix_cache_hit_tokens", "Prompt tokens taken from the prefix cache.",
                                    "hit_tokens"),
                                   ("prefix_cache_hits", "Admissions that found a saved prefix.", "hits"),
                                   ("prefix_cache_lookups", "Admissions that looked for one.", "lookups"),
                                   ("prefix_cache_stored", "States saved.", "stored"),
                                   ("prefix_cache_evictions", "Saved states evicted for room.", "evictions")):
                c = CounterMetricFamily(f"moeflash:{name}", doc, labels=labels + ["tier"])
                c.add_metric([self.model_name, "ram"], float(cache[key]))
                yield c
            g = GaugeMetricFamily("moeflash:prefix_cache_bytes", "Bytes of saved states held, per tier.",
                                  labels=labels + ["tier"])
            g.add_metric([self.model_name, "ram"], float(cache["bytes"]))
            disk = cache.get("disk")
            if disk is not None:
                g.add_metric([self.model_name, "disk"], float(disk["bytes"]))
            yield g
            if disk is not None:
                for name, doc, key in (("prefix_cache_disk_hits", "States read back from disk.", "read"),
                                       ("prefix_cache_disk_writes", "States written to disk.", "written"),
                                       ("prefix_cache_disk_evictions", "Files removed for room.", "evictions"),
                                       ("prefix_cache_bad_files", "Files found truncated, corrupt or foreign "
                                        "(removed; a miss).", "bad_files")):
                    c = CounterMetricFamily(f"moeflash:{name}", doc, labels=labels)
                    c.add_metric([self.model_name], float(disk[key]))
                    yield c
        experts = s.get("experts")
        if experts is not None:
            yield from self._experts(experts)

    def _experts(self, ex: dict):
        """The expert store's counters, per layer, and its cache occupancy; the same for its GPU tier."""
        yield from self._tier(ex, (
            ("expert_cache_hits", "Routed-expert accesses served from the cache.", "hits"),
            ("expert_cache_misses", "Routed-expert accesses read from disk.", "misses"),
            ("expert_cache_evictions", "Experts evicted from the cache.", "evictions"),
            ("expert_bytes_read", "Bytes of expert weights read from disk.", "bytes_read"),
            ("expert_prefetch_predicted", "Experts predicted for a layer before it ran.", "predicted"),
            ("expert_prefetch_correct", "Predicted experts the layer then used.", "predicted_used")), (
            ("expert_cache_resident", "Experts resident in the cache now.", "resident"),
            ("expert_cache_capacity", "Experts the cache budget holds.", "capacity_experts")))
        dev = ex.get("device")
        if dev is not None:  # the GPU tier above the host cache (engine/expert_tier.py)
            yield from self._tier(dev, (
                ("expert_device_hits", "Routed-expert accesses served from GPU memory.", "hits"),
                ("expert_device_misses", "Routed-expert accesses copied up from host RAM.", "misses"),
                ("expert_device_evictions", "Experts evicted from GPU memory.", "evictions"),
                ("expert_device_bytes_copied", "Bytes of experts copied host to GPU.", "bytes_read"),
                ("expert_device_prefetch_loads", "Experts copied up ahead of their layer.", "prefetch_loads")), (
                ("expert_device_resident", "Experts resident in GPU memory now.", "resident"),
                ("expert_device_capacity", "Experts the GPU budget holds.", "capacity_experts")))

    def _tier(self, stats: dict, counters: tuple, gauges: tuple):
        """One cache tier: a counter per (name, doc, key) with a sample per layer, a gauge per (name, doc, key)."""
        for name, doc, key in counters:
            c = CounterMetricFamily(f"moeflash:{name}", doc, labels=["model_name", "layer"])
            for i, layer in enumerate(stats["per_layer"]):
                c.add_metric([self.model_name, str(i)], float(layer[key]))
            yield c
        for name, doc, key in gauges:
            g = GaugeMetricFamily(f"moeflash:{name}", doc, labels=["model_name"])
            g.add_metric([self.model_name], float(stats[key]))
            yield g


class Metrics:
    def __init__(self, stats, model_name: str, limits: dict[str, float] | None = None):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.registry.register(_EngineCollector(stats, model_name, limits))
        r, lab = self.registry, ["model_name"]
        self.ttft = Histogram("moeflash:time_to_first_token_seconds", "Time from request arrival to its "
                              "first generated token.", lab, buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("moeflash:inter_token_latency_seconds", "Time between consecutive generated "
                             "tokens of a request.", lab, buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("moeflash:e2e_request_latency_seconds", "Time from request arrival to its "
                             "last token.", lab, buckets=_E2E_BUCKETS, registry=r)
        self.experts_per_token = Histogram(
            "moeflash:routed_experts_per_token", "Distinct routed experts read per token in a step "
            "(summed over layers; batching makes tokens share experts).", lab,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096), registry=r)
        self.requests = Counter("moeflash:request_success", "Finished requests by finish reason.",
                                lab + ["finished_reason"], registry=r)
        self.disconnects = Counter("moeflash:client_disconnects", "Requests aborted because the client "
                                   "left before the end.", lab, registry=r)
        self.errors = Counter("moeflash:request_errors", "Requests answered with an error, by status code.",
                              lab + ["status"], registry=r)
        self._last = {"forward_tokens": 0, "routed_experts_read": 0}

    def on_step(self, engine_stats: dict) -> None:
        """Per-step MoE figures from the engine's cumulative counters (called on the engine thread)."""
        tokens = engine_stats["forward_tokens"] - self._last["forward_tokens"]
        experts = engine_stats["routed_experts_read"] - self._last["routed_experts_read"]
        self._last = {k: engine_stats[k] for k in self._last}
        if tokens > 0 and experts > 0:
            self.experts_per_token.labels(self.model_name).observe(experts / tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
