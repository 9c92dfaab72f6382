"""A configured model's counters exist at zero from the first scrape, before any traffic or label.

Prometheus' rate() and increase() only count what a series gains after its first sample: a series born with the
first response (or the first label) already in it loses that response. With a handful of labels an hour, that loss
moved the confident-wrong ratio (or left it undefined); tests/test_real_tiers_meet.py shows it on a real Prometheus.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from proxy.app import COMPONENTS
from tests.plugins.recorded import RecordedUpstream, proxy_client
from tests.plugins.reliability_support import CHAT, chat_body


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


async def test_configured_models_start_with_zero_series(recorded: RecordedUpstream) -> None:
    recorded.serve(CHAT, "chat_k20.json")
    async with proxy_client(recorded, components=COMPONENTS, models=["smollm2", "second"]) as c:
        before = _samples((await c.get("/metrics")).text)
        for model in ("smollm2", "second"):
            for name, labels in (
                ("entropy_proxy_token_entropy_nats_count", {"token_class": "all"}),
                ("entropy_proxy_token_entropy_nats_sum", {"token_class": "all"}),
                ("entropy_proxy_tokens_total", {}),
                ("entropy_proxy_responses_flagged_total", {"flag": "confident"}),
                ("entropy_proxy_feedback_total", {"label": "correct"}),
                ("entropy_proxy_feedback_total", {"label": "incorrect"}),
                ("entropy_proxy_confident_wrong_total", {}),
            ):
                key = (name, tuple(sorted({"model": model, **labels}.items())))
                assert before.get(key) == 0.0, key
        assert not any(dict(k[1]).get("model") == "other" for k in before)  # no label for unseen traffic
        r = await c.post(CHAT, json=chat_body())
        assert r.status_code == 200
        after = _samples((await c.get("/metrics")).text)
        key = ("entropy_proxy_token_entropy_nats_count", (("model", "smollm2"), ("token_class", "all")))
        assert after[key] == r.json()["choices"][0]["entropy"]["tokens"]
