"""Render docs/otel-phoenix.png: a chat request through the proxy (otel on) into a real Arize Phoenix, with feedback,
and the trace opened in Phoenix's UI by headless Chromium.

    python -m scripts.otel_screenshot --upstream http://127.0.0.1:8011   # a running vLLM serving smollm2
    python -m scripts.otel_screenshot                                   # the tests' recorded vLLM answers

Phoenix comes from .venv-phoenix (scripts/setup-phoenix.sh), Chromium from Debian's ``chromium`` package.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.app import create_app  # noqa: E402
from proxy.settings import load_settings  # noqa: E402
from tests.plugins.phoenix import PhoenixAPI, start_phoenix  # noqa: E402
from tests.plugins.servers import serve_in_thread  # noqa: E402

PROJECT = "entropy-proxy"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.otel_screenshot", description=__doc__.split("\n")[0])
    ap.add_argument("--upstream", help="a vLLM base URL; default: the recorded fixtures")
    ap.add_argument("--out", default=str(ROOT / "docs" / "otel-phoenix.png"))
    ap.add_argument("--question", default="What is the capital of France? Answer in one sentence.")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp, start_phoenix() as phoenix:
        os.environ.update({"OTEL_EXPORTER_OTLP_ENDPOINT": phoenix, "OTEL_SERVICE_NAME": "entropy-proxy",
                           "OTEL_RESOURCE_ATTRIBUTES": f"openinference.project.name={PROJECT}",
                           "OTEL_BSP_SCHEDULE_DELAY": "200"})
        overrides = {"models": ["smollm2"], "otel.enabled": True, "audit.public": True, "audit.sample_rate": 1.0,
                     "audit.url": f"sqlite:///{tmp}/audit.db"}
        if args.upstream:
            app = create_app(load_settings({"upstream": args.upstream, **overrides}, environ={}))
        else:
            from tests.plugins.recorded import UPSTREAM, RecordedUpstream

            up = RecordedUpstream()
            up.serve("/v1/chat/completions", "chat_k20.json")
            app = create_app(load_settings({"upstream": UPSTREAM, **overrides}, environ={}),
                             transport=httpx.MockTransport(up))
        with serve_in_thread(app) as proxy, httpx.Client(base_url=proxy, timeout=120) as client:
            r = client.post("/v1/chat/completions", json={
                "model": "smollm2", "messages": [{"role": "user", "content": args.question}],
                "max_tokens": 48, "temperature": 0.7})
            r.raise_for_status()
            answer = r.json()
            client.post("/v1/feedback", json={"id": answer["id"], "correct": True}).raise_for_status()
        print("answer:", answer["choices"][0]["message"]["content"])
        print("entropy:", {k: answer["choices"][0]["entropy"][k] for k in ("mean", "confidence", "flags")})
        with PhoenixAPI(phoenix, PROJECT) as api:
            spans = api.wait_spans(_trace_of(api, answer["id"]), 2)
        span = next(s for s in spans if s["name"].startswith("chat"))
        shoot(phoenix, span["context"]["trace_id"], span["context"]["span_id"], args.out)
    print("wrote", args.out)
    return 0


def _trace_of(api: PhoenixAPI, response_id: str) -> str:
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = api.http.get(f"/v1/projects/{api.project}/spans", params={"limit": 100})
        if r.status_code == 200:
            for s in r.json()["data"]:
                if s["attributes"].get("gen_ai.response.id") == response_id:
                    return str(s["context"]["trace_id"])
        time.sleep(0.5)
    raise SystemExit(f"no span with gen_ai.response.id {response_id} arrived in Phoenix")


def shoot(phoenix: str, trace_id: str, span_id: str, out: str) -> None:
    """The request span selected in its trace (the feedback span beneath it), its Events tab open and the three
    evaluations expanded."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1330})
        page.goto(f"{phoenix}/redirects/spans/{span_id}", wait_until="networkidle")
        page.get_by_text("evaluation feedback").first.wait_for(timeout=60_000)
        page.get_by_role("tab", name="Events").click()
        rows = page.get_by_text("gen_ai.evaluation.result")
        rows.first.wait_for(timeout=30_000)
        for i in range(rows.count()):
            rows.nth(i).click()
        page.get_by_text("forking_fraction").first.wait_for(timeout=30_000)
        page.wait_for_timeout(1000)  # let the expanded rows settle before the picture
        page.screenshot(path=out)
        browser.close()


if __name__ == "__main__":
    sys.exit(main())
