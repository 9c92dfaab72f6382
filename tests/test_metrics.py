import numpy as np
import pytest
from fastapi import FastAPI
from httpx import ASGITransport, AsyncClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy import metrics as metrics_mod
from proxy.observe import ObserverHub, RequestEvent
from proxy.settings import load_settings

from .synthetic import formatted, observation, token_entropies


def _setup(models: list[str] | None = None) -> tuple[FastAPI, ObserverHub, CollectorRegistry]:
    s = load_settings({"upstream": "http://u", "models": models or ["m1", "m2"], "monitors.window": 50,
                       "monitors.baseline": 1_000, "monitors.baseline_responses": 20}, environ={})
    app, hub, reg = FastAPI(), ObserverHub(), CollectorRegistry()
    cm = metrics_mod.install(app, s, hub, reg)
    assert cm is not None
    return app, hub, reg


def _samples(reg: CollectorRegistry) -> dict[str, list]:  # type: ignore[type-arg]
    out: dict[str, list] = {}  # type: ignore[type-arg]
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def _value(samples, name: str, **labels: str) -> float:  # type: ignore[no-untyped-def]
    vals = [s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(vals) == 1, (name, labels, vals)
    return float(vals[0])


def test_counts_match_what_was_fed() -> None:
    app, hub, reg = _setup()
    rng = np.random.default_rng(0)
    fed = {"m1": 0, "other": 0}
    for i in range(120):
        model = "m1" if i % 3 else "unknown-model"
        h = token_entropies(rng, int(rng.integers(1, 200)))
        flags = ["confident"] if i % 4 == 0 else (["uncertain", "forking_heavy"] if i % 4 == 1 else [])
        hub.observe(observation(h, formatted(rng, "prose"), model=model, flags=flags))
        hub.request_done(RequestEvent(model=model, endpoint="chat", status=200, overhead_s=0.001))
        fed["m1" if model == "m1" else "other"] += h.size
    app.state.monitoring.process_pending()
    s = _samples(reg)
    for label, n in fed.items():
        assert _value(s, "entropy_proxy_token_entropy_nats_count", model=label, token_class="all") == n
        assert _value(s, "entropy_proxy_tokens_total", model=label) == n
        planning = _value(s, "entropy_proxy_token_entropy_nats_count", model=label, token_class="planning")
        execution = _value(s, "entropy_proxy_token_entropy_nats_count", model=label, token_class="execution")
        assert planning + execution == n and planning > 0
    assert _value(s, "entropy_proxy_responses_flagged_total", model="m1", flag="confident") == sum(
        1 for i in range(120) if i % 3 and i % 4 == 0)
    assert _value(s, "entropy_proxy_responses_flagged_total", model="other", flag="uncertain") == sum(
        1 for i in range(120) if not i % 3 and i % 4 == 1)
    # a configured model without traffic has its counters at zero (rate() then counts its first response)
    assert _value(s, "entropy_proxy_tokens_total", model="m2") == 0
    assert _value(s, "entropy_proxy_token_entropy_nats_count", model="m2", token_class="all") == 0
    assert _value(s, "entropy_proxy_requests_total", model="m1", endpoint="chat", status="200") == 80
    assert _value(s, "entropy_proxy_response_entropy_nats_count", model="m1") == 80
    assert _value(s, "entropy_proxy_overhead_seconds_count", endpoint="chat") == 120
    # buckets are cumulative and fine near 0: over half the synthetic tokens are below 0.01 nats
    b = {x.labels["le"]: x.value for x in s["entropy_proxy_token_entropy_nats_bucket"]
         if x.labels["model"] == "m1" and x.labels["token_class"] == "all"}
    assert b["0.01"] > 0.5 * b["+Inf"] and list(b.values()) == sorted(b.values())
    # gauges from the monitors, read at scrape time
    assert 0 <= _value(s, "entropy_proxy_collapse_score", model="m1") <= 1
    assert _value(s, "entropy_proxy_entropy_state", model="m1", state="healthy") == 1
    assert _value(s, "entropy_proxy_diversity", model="m1", measure="format_entropy") == 0.0
    assert _value(s, "entropy_proxy_entropy_drift", model="m1", method="psi") >= 0


def test_labels_bounded_by_allow_list() -> None:
    _, hub, reg = _setup()
    rng = np.random.default_rng(1)
    for i in range(1_000):
        name = "".join(chr(c) for c in rng.integers(97, 123, 12))
        hub.observe(observation(token_entropies(rng, 8), "x y z", model=name))
        hub.request_done(RequestEvent(model=name, endpoint=f"e{i}", status=200 + i, overhead_s=0.0,
                                      upstream_error=f"kind{i}"))
    models, others = set(), {}
    for samples in _samples(reg).values():
        for x in samples:
            if "model" in x.labels:
                models.add(x.labels["model"])
            for k in ("endpoint", "kind", "status"):
                if k in x.labels:
                    others.setdefault(k, set()).add(x.labels[k])
    assert models <= {"m1", "m2", "other"}
    assert others["endpoint"] <= {"chat", "completions", "other"}
    assert others["kind"] <= {"other"}
    assert len(others["status"]) <= 501


def test_component_methods_and_routes() -> None:
    app, hub, reg = _setup()
    m = app.state.metrics
    m.feedback("m1", correct=False, confident=True, mean_entropy=0.2)
    m.feedback("m1", correct=True)
    m.audit_dropped("queue_full")
    m.audit_dropped("some free text")
    m.set_calibration("m2", "ece", 0.12)
    m.set_recognition_ratio("m2", 3.1)
    m.set_state("m2", "collapse")
    with pytest.raises(ValueError):
        m.set_calibration("m2", "free", 1.0)
    hub.observe(observation(np.full(10, 0.1), "x", model="m2"))
    s = _samples(reg)
    assert _value(s, "entropy_proxy_feedback_total", model="m1", label="incorrect") == 1
    assert _value(s, "entropy_proxy_confident_wrong_total", model="m1") == 1
    assert _value(s, "entropy_proxy_audit_dropped_total", reason="other") == 1
    assert _value(s, "entropy_proxy_calibration", model="m2", measure="ece") == 0.12
    assert _value(s, "entropy_proxy_recognition_ratio", model="m2") == 3.1
    assert _value(s, "entropy_proxy_entropy_state", model="m2", state="collapse") == 1


async def test_http_routes() -> None:
    app, hub, reg = _setup()
    rng = np.random.default_rng(2)
    for _ in range(20):
        hub.observe(observation(token_entropies(rng), formatted(rng, "list"), model="m1"))
    app.state.monitoring.process_pending()  # the warm-up finishes once the text readings cover it
    async with app.state.monitoring.running(), AsyncClient(
        transport=ASGITransport(app=app), base_url="http://t"
    ) as c:
        r = await c.get("/metrics")
        assert r.status_code == 200 and "entropy_proxy_tokens_total" in r.text
        assert r.headers["content-type"].startswith("text/plain")
        st = (await c.get("/v1/entropy/status")).json()
        assert st["models"]["m1"]["responses"] == 20 and st["models"]["m1"]["state"] == "healthy"
        b = (await c.get("/v1/entropy/baseline")).json()
        assert b["format"] == "entropy-proxy-baseline" and b["models"]["m1"]["drift"]["complete"]
