"""The real tier: a real vLLM (CPU build, SmolLM2-135M-Instruct, float32), the proxy on a real socket in front
of it, and the official ``openai`` client pointed at the proxy. One vLLM per test session."""

import httpx
import openai
import pytest

from proxy.app import create_app
from proxy.settings import load_settings
from tests.plugins.servers import free_port, serve_in_thread

pytestmark = pytest.mark.vllm

Q = [{"role": "user", "content": "Name three colours."}]
ENTROPY_KEYS = {
    "estimator", "top_k", "tokens", "mean", "mean_lower", "mean_upper", "max", "p90", "forking_threshold",
    "forking_tokens", "forking_fraction", "mean_logprob", "confidence", "min_token_prob", "low_confidence_tokens",
    "flags",
}


@pytest.fixture(scope="module")
def proxy_url(vllm_server, tmp_path_factory):
    """The whole proxy (metrics, monitors, audit, probe) as a user runs it."""
    db = tmp_path_factory.mktemp("audit") / "audit.db"
    settings = load_settings({"upstream": vllm_server, "audit.url": f"sqlite:///{db}"}, environ={})
    with serve_in_thread(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def client(proxy_url):
    return openai.OpenAI(base_url=f"{proxy_url}/v1", api_key="sk-test", max_retries=0, timeout=120)


def extra(obj, key):
    return (obj.model_extra or {}).get(key)


def check_summary(ent, tokens=None):
    assert ENTROPY_KEYS <= set(ent)
    assert ent["estimator"] == "topk-tail-v1" and ent["top_k"] == 20
    assert ent["mean_lower"] <= ent["mean"] <= ent["mean_upper"]
    assert 0 <= ent["confidence"] <= 1
    if tokens is not None:
        assert ent["tokens"] == tokens


def test_chat_without_logprobs(client):
    r = client.chat.completions.create(model="smollm2", messages=Q, max_tokens=24, temperature=1.0, seed=1)
    ch = r.choices[0]
    assert ch.logprobs is None
    check_summary(extra(ch, "entropy"), tokens=r.usage.completion_tokens)


def test_chat_top_logprobs_3_and_per_token_bounds(client):
    r = client.chat.completions.create(
        model="smollm2", messages=Q, max_tokens=24, logprobs=True, top_logprobs=3, seed=2,
        extra_body={"entropy_detail": "tokens"},
    )
    ch = r.choices[0]
    assert all(len(p.top_logprobs) == 3 for p in ch.logprobs.content)
    ent = extra(ch, "entropy")
    check_summary(ent, tokens=len(ch.logprobs.content))
    for lo, pt, hi in zip(ent["per_token_lower"], ent["per_token"], ent["per_token_upper"], strict=True):
        assert lo <= pt <= hi


def test_chat_n2(client):
    r = client.chat.completions.create(model="smollm2", messages=Q, max_tokens=16, n=2, seed=3)
    assert len(r.choices) == 2
    for ch in r.choices:
        check_summary(extra(ch, "entropy"))


def test_chat_stream(client):
    stream = client.chat.completions.create(
        model="smollm2", messages=Q, max_tokens=24, stream=True, stream_options={"include_usage": True}, seed=4
    )
    per_token, final, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            assert ch.logprobs is None
            ent = extra(ch, "entropy")
            if ch.finish_reason:
                final = ent
                per_token += ent.get("per_token", [])
            elif ent:
                per_token += ent["per_token"]
    check_summary(final, tokens=len(per_token))
    assert usage is not None and usage.completion_tokens == final["tokens"]


def test_completions_and_completions_stream(client):
    r = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=12, logprobs=2)
    ch = r.choices[0]
    check_summary(extra(ch, "entropy"), tokens=len(ch.logprobs.tokens))
    assert all(len(d) <= 3 for d in ch.logprobs.top_logprobs)
    finals = [extra(c, "entropy") for chunk in client.completions.create(
        model="smollm2", prompt="Once upon a time", max_tokens=12, stream=True) for c in chunk.choices
        if c.finish_reason]
    check_summary(finals[0], tokens=12)


def test_unknown_model_is_404_passed_through(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=Q, max_tokens=4)
    assert e.value.status_code == 404


def test_metrics_count_what_was_served(client, proxy_url):
    from prometheus_client.parser import text_string_to_metric_families

    before = _tokens_count(proxy_url)
    r = client.chat.completions.create(model="smollm2", messages=Q, max_tokens=10, seed=9)
    after = _tokens_count(proxy_url)
    assert after - before == r.usage.completion_tokens
    families = {f.name for f in text_string_to_metric_families(httpx.get(f"{proxy_url}/metrics").text)}
    assert {"entropy_proxy_requests", "entropy_proxy_token_entropy_nats", "entropy_proxy_overhead_seconds"} <= families


def _tokens_count(proxy_url):
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(httpx.get(f"{proxy_url}/metrics").text):
        if fam.name == "entropy_proxy_token_entropy_nats":
            return sum(s.value for s in fam.samples
                       if s.name.endswith("_count") and s.labels.get("token_class") == "all")
    return 0


def test_models_pass_through(client, vllm_server):
    direct = httpx.get(f"{vllm_server}/v1/models").json()["data"]
    assert [m.id for m in client.models.list()] == [m["id"] for m in direct]


def test_k_over_vllms_max_is_learnt(vllm_server):
    settings = load_settings({"upstream": vllm_server, "top_k": 25, "audit.enabled": False}, environ={})
    with serve_in_thread(create_app(settings)) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        stream = c.chat.completions.create(model="smollm2", messages=Q, max_tokens=8, stream=True)
        finals = [extra(ch, "entropy") for chunk in stream for ch in chunk.choices if ch.finish_reason]
        assert finals[0]["top_k"] == 20
        r = c.chat.completions.create(model="smollm2", messages=Q, max_tokens=8)
        assert extra(r.choices[0], "entropy")["top_k"] == 20


def test_upstream_down_is_502():
    settings = load_settings({"upstream": f"http://127.0.0.1:{free_port()}", "audit.enabled": False}, environ={})
    with serve_in_thread(create_app(settings)) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(model="smollm2", messages=Q, max_tokens=4)
        assert e.value.status_code == 502
        assert e.value.body["code"] == "upstream_unavailable"
        assert httpx.get(f"{url}/readyz").status_code == 503
