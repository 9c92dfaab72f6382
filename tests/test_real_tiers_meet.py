"""The real tiers meet: each test puts two real parts on either side of the running proxy.

- real vLLM -> proxy -> real Prometheus: model traffic through the proxy, Prometheus scraping it with the project's
  recording and alert rules (durations compressed 60x, tests/plugins/prometheus.py); the recorded series and an
  alert expression are checked against figures computed here from the responses' own annotations.
- proxy -> real PostgreSQL -> feedback -> report and /audit: responses recorded in PostgreSQL, labels posted
  through ``/v1/feedback``, then ``entropy-proxy audit report`` and ``GET /audit`` must list the confident-but-wrong
  responses first and show calibration figures equal to an independent computation from the labels.
"""

from __future__ import annotations

import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.replay_upstream import start_replay_upstream
from proxy.cli import main as cli_main
from tests.plugins.prometheus import compress_rules, start_prometheus
from tests.plugins.reliability_support import running_proxy

# --- independent figures ---------------------------------------------------------------------------------------


def brier(conf: list[float], ok: list[bool]) -> float:
    return sum((c - float(y)) ** 2 for c, y in zip(conf, ok, strict=True)) / len(conf)


def ece10(conf: list[float], ok: list[bool]) -> float:
    bins: dict[int, list[tuple[float, bool]]] = {}
    for c, y in zip(conf, ok, strict=True):
        bins.setdefault(min(int(c * 10), 9), []).append((c, y))
    return sum(abs(sum(c for c, _ in b) / len(b) - sum(y for _, y in b) / len(b)) * len(b)
               for b in bins.values()) / len(conf)


def auroc(conf: list[float], ok: list[bool]) -> float:
    """P(confidence of a correct answer > that of a wrong one), ties counting a half."""
    pos = [c for c, y in zip(conf, ok, strict=True) if y]
    neg = [c for c, y in zip(conf, ok, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _chat(base: str, model: str, prompt: str, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], **extra}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300.0)
    assert r.status_code == 200, r.text
    out = r.json()
    out["_id"] = r.headers["x-entropy-request-id"]
    return out


# --- proxy -> PostgreSQL -> feedback -> report and /audit --------------------------------------------------------

def test_postgres_feedback_report_and_audit_page(postgres_db_url: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    model = "smollm2"
    upstream, stop = start_replay_upstream(tokens=16, model=model)
    try:
        settings = {"audit.enabled": True, "audit.url": postgres_db_url, "audit.sample_rate": 1.0,
                    "audit.store_text": True}
        with running_proxy(upstream, **settings) as p:
            responses: list[dict[str, Any]] = []
            for entropy in ("low", "normal"):  # peaked distributions (confident), then the recorded ones
                httpx.post(f"{upstream}/_replay/config", json={"entropy": entropy}).raise_for_status()
                for n in (4, 7, 10, 13, 16):  # lengths differ, so confidences do
                    responses.append(_chat(p.url, model, f"question {entropy} {n}", max_tokens=n))
            summaries = [r["choices"][0]["entropy"] for r in responses]
            confident = [i for i, s in enumerate(summaries) if "confident" in s["flags"]]
            assert len(confident) == 5 and len(summaries) - len(confident) == 5, [s["flags"] for s in summaries]
            # Labels: two confident answers wrong (the report's first list), the rest alternate.
            wrong_confident = {responses[i]["_id"] for i in confident[:2]}
            labels = {}
            for i, r in enumerate(responses):
                labels[r["_id"]] = r["_id"] not in wrong_confident and (i in confident or i % 2 == 0)
                fb = p.client.post("/v1/feedback", json={"id": r["_id"], "correct": labels[r["_id"]]})
                assert fb.status_code == 200, fb.text
            page = p.client.get("/audit").text
        conf = [s["confidence"] for s in summaries]
        ok = [labels[r["_id"]] for r in responses]
        expected = {"Brier score": brier(conf, ok), "ECE (10 bins)": ece10(conf, ok), "AUROC": auroc(conf, ok)}

        # The command line reads the same PostgreSQL store, options after the sub-command.
        png = tmp_path / "reliability.png"
        assert cli_main(["audit", "report", "--url", postgres_db_url, "--png", str(png)]) == 0
        report = capsys.readouterr().out
    finally:
        stop()

    assert f"{len(responses)} responses recorded" in report
    wrong_block = report.split("Confident but wrong (2):", 1)[1].split("\n\n", 1)[0]
    assert {ln.split()[0] for ln in wrong_block.strip().splitlines()} == wrong_confident
    assert f"labelled responses: {len(ok)} ({sum(ok)} correct, {len(ok) - sum(ok)} incorrect)" in report
    for name, value in expected.items():
        shown = re.search(rf"{re.escape(name)}:\s+([0-9.]+)", report)
        assert shown is not None and float(shown.group(1)) == pytest.approx(value, abs=6e-5), (name, report)
    assert png.read_bytes()[:4] == b"\x89PNG"

    # The page: the confident-wrong section holds exactly those responses, the calibration the same figures.
    section = page.split('<section id="confident-wrong">', 1)[1].split("</section>", 1)[0]
    assert "Confident but wrong (2)" in section
    assert all(rid in section for rid in wrong_confident)
    assert not any(r["_id"] in section for r in responses if r["_id"] not in wrong_confident)
    calib = page.split('<section id="calibration">', 1)[1].split("</section>", 1)[0]
    for value in expected.values():
        assert f"{value:.4f}" in calib or f"{value + 5e-5:.4f}" in calib or f"{value - 5e-5:.4f}" in calib
    assert "question low 4" in page  # store_text: the prompt is in PostgreSQL and on the page


# --- real vLLM -> proxy -> real Prometheus ----------------------------------------------------------------------

PROMPTS = [  # greedy answers of SmolLM2-135M average 0.4-0.6 nats; sampled ones well above
    ("Count from 1 to 12, separated by commas.", 0.0),
    ("What is the capital of France? Answer with one word.", 0.0),
    ("Write one sentence about the sea.", 1.0),
    ("Invent a name for a cat.", 1.0),
]


def _scraped(prom: Any, expr: str, at_least: float) -> bool:
    result = prom.query(expr)
    return bool(result) and float(result[0]["value"][1]) >= at_least


@pytest.mark.prometheus
def test_rules_evaluate_on_real_vllm_traffic(vllm_server: str, vllm_model: str, prometheus_bin: str,
                                             tmp_path: Path) -> None:
    model = vllm_model
    # A 135M model is seldom below the default 0.3 nats: the `confident` cut-off sits between its greedy and its
    # sampled answers, so the labels below give a confident-wrong share strictly between 0 and 1.
    settings = {"models": [model], "audit.enabled": True, "audit.url": f"sqlite:///{tmp_path / 'a.db'}",
                "audit.sample_rate": 1.0, "thresholds.confident_mean": 0.8}
    with running_proxy(vllm_server, **settings) as p:
        proxy_target = p.url.removeprefix("http://")
        vllm_target = vllm_server.removeprefix("http://")
        targets = {"entropy-proxy": [proxy_target], "vllm": [vllm_target]}
        with start_prometheus(targets, compress_rules(), tmp_path / "prometheus", binary=prometheus_bin) as prom:
            count = f'entropy_proxy_token_entropy_nats_count{{model="{model}", token_class="all"}}'
            # The configured model's series exist at zero before any traffic: rate() and increase() then see
            # the first response whole (a series born with a value loses it), which the exact checks below need.
            prom.wait_for("zero series scraped", lambda: _scraped(prom, count, 0), timeout=30)
            warm_tokens = 0
            jobs = [(text, temp) for text, temp in PROMPTS for _ in range(5)]  # 20 responses, 16 tokens at most
            with ThreadPoolExecutor(4) as pool:
                responses = list(pool.map(lambda j: _chat(p.url, model, j[0], max_tokens=16, temperature=j[1],
                                                          seed=7), jobs))
            summaries = [r["choices"][0]["entropy"] for r in responses]
            tokens = sum(s["tokens"] for s in summaries)
            expected_mean = sum(s["mean"] * s["tokens"] for s in summaries) / tokens
            prom.wait_for("the traffic scraped", lambda: _scraped(prom, count, warm_tokens + tokens), timeout=30)

            # Labels after the traffic: each confident answer wrong, the others right.
            confident = sum("confident" in s["flags"] for s in summaries)
            assert 0 < confident < len(summaries), [s["flags"] for s in summaries]
            for r, s in zip(responses, summaries, strict=True):
                fb = p.client.post("/v1/feedback", json={"id": r["_id"], "correct": "confident" not in s["flags"]})
                assert fb.status_code == 200, fb.text
            labelled = f'entropy_proxy_feedback_total{{model="{model}"}}'
            prom.wait_for("the labels scraped",
                          lambda: _scraped(prom, f"sum({labelled})", len(responses)), timeout=30)
            time.sleep(2.5)  # two rule evaluations after the scrape

            # Recorded series, on this traffic. The 1d window (24 min here) holds the series' whole life, from
            # zero: its mean is the token-weighted mean of the responses' own annotations (rounded to 1e-4 there).
            mean1d = prom.query(f'model:entropy_proxy_token_entropy_nats:mean1d{{model="{model}"}}')
            assert len(mean1d) == 1
            assert float(mean1d[0]["value"][1]) == pytest.approx(expected_mean, abs=2e-4)
            mean30m = prom.query(f'model:entropy_proxy_token_entropy_nats:mean30m{{model="{model}"}}')
            assert mean30m and math.isfinite(float(mean30m[0]["value"][1]))
            increase = prom.query(f'model:entropy_proxy_feedback:increase1h{{model="{model}"}}')
            assert float(increase[0]["value"][1]) == pytest.approx(len(responses), rel=0.25)
            ratio = prom.query(f'model:entropy_proxy_confident_wrong:ratio_rate1h{{model="{model}"}}')
            assert ratio, "no confident-wrong ratio recorded from the labels"
            assert float(ratio[0]["value"][1]) == pytest.approx(confident / len(responses), abs=1e-6)
            # The alert's own expression on this traffic: it holds exactly when the share is over 10 %.
            rule = next(r for g in prom.rules() for r in g["rules"]
                        if r.get("name") == "EntropyProxyConfidentWrongRateHigh")
            assert rule["health"] == "ok", rule.get("lastError")
            firing_condition = prom.query(rule["query"])
            assert bool(firing_condition) == (confident / len(responses) > 0.1), (confident, firing_condition)
            if firing_condition:
                assert {a["labels"]["model"] for a in prom.alerts("EntropyProxyConfidentWrongRateHigh")} == {model}
            for group in prom.rules():
                for r in group["rules"]:
                    assert r["health"] == "ok", (r["name"], r.get("lastError"))
    assert math.isfinite(expected_mean)
