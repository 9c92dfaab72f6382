"""``entropy-proxy audit list|show ID|report|export``: read the audit store from the command line.

The store is the one given by ``--url``, else ``audit.url`` from the config (``--config FILE``,
``ENTROPY_PROXY_CONFIG`` or ``ENTROPY_PROXY_AUDIT__URL``). ``add_parser`` registers the sub-command and sets
``func`` to a callable ``(args) -> int`` (the exit status).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import orjson

from proxy.audit.page import FLAGS, LABEL_CHOICES
from proxy.audit.report import Filters, build_report, one_line, probe_text, text_report, write_reliability_png
from proxy.audit.store import AuditStore, StoreError
from proxy.settings import SettingsError, load_settings


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("audit", help="read the audit trail: list, show, report, export")
    p.add_argument("--url", help="audit store URL (default: audit.url from the config)")
    p.add_argument("--config", help="YAML config file")
    sub = p.add_subparsers(dest="audit_cmd", required=True)

    def filters(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model")
        sp.add_argument("--flag", choices=FLAGS)
        sp.add_argument("--label", choices=LABEL_CHOICES)
        sp.add_argument("--limit", type=int, default=50)

    filters(sub.add_parser("list", help="recorded responses, most recent first"))
    show = sub.add_parser("show", help="one response: summary, per-token entropies, label, probe results")
    show.add_argument("id")
    rep = sub.add_parser("report", help="confident-but-wrong first, then calibration and a reliability PNG")
    filters(rep)
    rep.add_argument("--png", "--out", "-o", dest="png", default=None, metavar="PATH",
                     help="write the reliability diagram (PNG) to PATH; none is written unless asked")
    rep.add_argument("--window", type=int, default=None, help="use the last N labelled responses")
    exp = sub.add_parser("export", help="every recorded response as JSON lines")
    exp.add_argument("--out", "-o", default="-", help="output file ('-' for stdout)")
    p.set_defaults(func=run)


def resolve_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url)
    # The audit commands need no upstream: give the loader a placeholder so only audit.* has to be valid.
    settings = load_settings({"upstream": "http://unused.invalid"}, config_file=args.config)
    return settings.audit.url


def run(args: argparse.Namespace) -> int:
    try:
        url = resolve_url(args)
    except SettingsError as e:
        print(f"entropy-proxy: {e}", file=sys.stderr)
        return 2
    return asyncio.run(_run(args, url))


async def start_or_report(store: AuditStore) -> bool:
    """Open the store for a CLI command; on failure print one line (not a traceback), close it, return False."""
    try:
        await store.start()
    except Exception as e:  # noqa: BLE001 - one line, not a traceback
        print(f"entropy-proxy: cannot open audit store: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        await store.close()
        return False
    return True


async def _run(args: argparse.Namespace, url: str) -> int:
    try:
        store = AuditStore(url)
    except StoreError as e:
        print(f"entropy-proxy: {e}", file=sys.stderr)
        return 1
    if not await start_or_report(store):
        return 1
    try:
        cmd = args.audit_cmd
        if cmd == "list":
            return await _list(store, args)
        if cmd == "show":
            return await _show(store, args.id)
        if cmd == "report":
            return await _report(store, args)
        return await _export(store, args.out)
    finally:
        await store.close()


def _filters(args: argparse.Namespace) -> Filters:
    return Filters(model=args.model, flag=args.flag, label=args.label, limit=args.limit)


async def _list(store: AuditStore, args: argparse.Namespace) -> int:
    f = _filters(args)
    rows = await store.recent(model=f.model, flag=f.flag, label=f.label, limit=f.limit)
    for r in rows:
        print(one_line(r))
    if not rows:
        print("no recorded responses", file=sys.stderr)
    return 0


def _jsonable(r: dict[str, Any]) -> dict[str, Any]:
    out = dict(r)
    out.pop("pk", None)
    out["label"] = None if r.get("correct") is None else ("correct" if r["correct"] else "incorrect")
    return out


async def _show(store: AuditStore, rid: str) -> int:
    rows = await store.get(rid)
    if not rows:
        print(f"entropy-proxy: no recorded response with id {rid!r}", file=sys.stderr)
        return 1
    # The probe scores a response, not one of its choices: every choice shows the response's results.
    probe = [_probe_jsonable(p) for p in (await store.probe_results_for([rid])).get(rid, [])]
    for r in rows:
        print(json.dumps({**_jsonable(r), "probe": probe}, indent=2, ensure_ascii=False))
    for p in probe:
        print(f"recognition probe: {probe_text(p)}", file=sys.stderr)
    return 0


def _probe_jsonable(p: dict[str, Any]) -> dict[str, Any]:
    out = dict(p)
    out.pop("pk", None)
    out.pop("response_id", None)
    return out


async def _report(store: AuditStore, args: argparse.Namespace) -> int:
    report = await build_report(store, _filters(args), window=args.window)
    sys.stdout.write(text_report(report))
    if args.png:
        try:
            path = write_reliability_png(report.calibration.bins, args.png)
        except RuntimeError as e:
            print(f"entropy-proxy: {e}", file=sys.stderr)
            return 1
        print(f"reliability diagram: {Path(path).resolve()}")
    else:
        print("reliability diagram: not written (pass --png PATH)")
    return 0


async def _export(store: AuditStore, out: str) -> int:
    fh = sys.stdout.buffer if out == "-" else open(out, "wb")  # noqa: SIM115 - closed below
    n = 0
    try:
        async for r in store.iter_all():
            fh.write(orjson.dumps(_jsonable(r)) + b"\n")
            n += 1
    finally:
        if out != "-":
            fh.close()
        else:
            fh.flush()
    print(f"exported {n} responses", file=sys.stderr)
    return 0
