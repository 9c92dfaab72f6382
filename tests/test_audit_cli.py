"""``entropy-proxy audit list|show|report|export`` against a seeded SQLite store."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import pytest

from proxy.audit.store import AuditStore
from proxy.audit.writer import record_from_observation
from proxy.cli_audit import add_parser
from tests.test_audit_store import make_obs


def _seed(url: str) -> None:
    async def go() -> None:
        s = AuditStore(url)
        await s.start()
        now = time.time()
        obs = [
            make_obs("r-ok", flags=("confident",), confidence=0.97, created=now - 3),
            make_obs("r-bad", flags=("confident",), confidence=0.92, created=now - 2),
            make_obs("r-unsure", flags=("uncertain",), confidence=0.35, created=now - 1),
            make_obs("r-new", flags=(), confidence=0.7, created=now),
        ]
        await s.insert_batch([record_from_observation(o, store_text=False) for o in obs])
        for rid, ok in (("r-ok", True), ("r-bad", False), ("r-unsure", False)):
            await s.set_feedback(rid, ok)
        await s.close()

    asyncio.run(go())


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="entropy-proxy")
    add_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


@pytest.fixture
def url(tmp_path: Path) -> str:
    u = f"sqlite:///{tmp_path}/audit.db"
    _seed(u)
    return u


def test_list_and_filters(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["audit", "--url", url, "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == ["r-new", "r-unsure", "r-bad", "r-ok"]
    assert _run(["audit", "--url", url, "list", "--label", "incorrect"]) == 0
    assert [ln.split()[0] for ln in capsys.readouterr().out.splitlines()] == ["r-unsure", "r-bad"]


def test_show(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["audit", "--url", url, "show", "r-bad"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["response_id"] == "r-bad" and shown["label"] == "incorrect" and len(shown["entropies"]) == 7
    assert shown["tokens"] is None and shown["completion"] is None
    assert _run(["audit", "--url", url, "show", "missing"]) == 1
    assert "no recorded response" in capsys.readouterr().err


def test_report_confident_wrong_first_and_png(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "rel.png"
    assert _run(["audit", "--url", url, "report", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    section = out.split("Confident but wrong (1):")[1].split("Calibration")[0]
    assert "r-bad" in section and "r-ok" not in section and "r-unsure" not in section
    assert out.index("Confident but wrong") < out.index("Brier score")
    # Labels: (0.97, 1), (0.92, 0), (0.35, 0). Brier = (0.03² + 0.92² + 0.35²) / 3.
    assert f"Brier score:        {(0.03**2 + 0.92**2 + 0.35**2) / 3:.4f}" in out
    assert "AUROC:              1.0000" in out
    assert "ECE (10 bins):" in out and "saturation (>=0.99): 0.0000" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_export_jsonl(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "audit.jsonl"
    assert _run(["audit", "--url", url, "export", "-o", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["response_id"] for r in rows] == ["r-ok", "r-bad", "r-unsure", "r-new"]
    assert rows[1]["label"] == "incorrect" and rows[3]["label"] is None
    assert "exported 4 responses" in capsys.readouterr().err


def test_url_from_config_and_bad_store(tmp_path: Path, url: str, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"upstream: http://127.0.0.1:8000\naudit:\n  url: {url}\n")
    assert _run(["audit", "--config", str(cfg), "list"]) == 0
    assert "r-bad" in capsys.readouterr().out
    cfg.write_text("audit:\n  sample_rate: 7\n")
    assert _run(["audit", "--config", str(cfg), "list"]) == 2
    assert "audit.sample_rate" in capsys.readouterr().err
    assert _run(["audit", "--url", "mysql://x@y/z", "list"]) == 1
