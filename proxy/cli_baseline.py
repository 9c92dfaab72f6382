"""``entropy-proxy baseline save|load|show FILE``: drift baselines as small JSON files; ``pin|unpin|list|show
--model`` work on the baselines per (model, revision) in the shared store (:mod:`proxy.baselines.cli`).

- ``save FILE``: fetch the running proxy's current baselines (``GET /v1/entropy/baseline`` at ``--url``) and write
  them to FILE;
- ``show FILE``: print a saved file, one block per model;
- ``load FILE``: check a file and print how to make the proxy compare against it (``monitors.baseline_file``),
  which takes effect at the next start: a restart or a new model version is then compared with the old one.

Each sub-command sets ``func`` (``args -> exit code``) on the parsed namespace.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .baselines import cli as store_cli
from .monitoring import validate_baseline


def _read(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise SystemExit(f"baseline: cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise SystemExit(f"baseline: {path} is not JSON: {e}") from None
    try:
        return validate_baseline(data)
    except ValueError as e:
        raise SystemExit(f"baseline: {path}: {e}") from None


def _save(args: argparse.Namespace) -> int:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = args.url.rstrip("/") + "/v1/entropy/baseline"
    try:
        resp = httpx.get(url, headers=headers, timeout=10.0)
    except httpx.HTTPError as e:
        print(f"baseline save: cannot reach {url}: {e}", file=sys.stderr)
        return 1
    if resp.status_code != 200:
        print(f"baseline save: {url} answered {resp.status_code}", file=sys.stderr)
        return 1
    data = resp.json()
    try:
        validate_baseline(data)
    except ValueError as e:
        print(f"baseline save: the proxy sent an invalid baseline: {e}", file=sys.stderr)
        return 1
    if not data["models"]:
        print("baseline save: the proxy has no baseline yet (no traffic since start)", file=sys.stderr)
        return 1
    Path(args.file).write_text(json.dumps(data, indent=1) + "\n")
    print(f"saved baselines of {len(data['models'])} model(s) to {args.file}")
    return 0


def _show(args: argparse.Namespace) -> int:
    data = _read(args.file)
    print(f"{args.file}: {data['format']} v{data['version']}, created {data.get('created')}")
    for label, entry in sorted(data["models"].items()):
        d = entry["drift"]
        tokens = sum(d["token_counts"])
        print(f"model {label}: {tokens} tokens, {sum(d['response_counts'])} responses, complete={d.get('complete')}")
        edges = [float(e) for e in d["edges"]]
        for lo, hi, c in zip(edges, edges[1:], d["token_counts"], strict=False):
            print(f"  [{lo:g}, {hi:g})  {c / tokens:7.3%}")
        col = entry.get("collapse") or {}
        ent = col.get("entropy") or {}
        if ent.get("mu0") is not None:
            print(f"  response mean entropy: {ent['mu0']:.4f} +- {ent['sigma0']:.4f} nats")
        div = {k: v for k, v in (col.get("diversity") or {}).items() if v is not None}
        if div:
            print("  diversity: " + ", ".join(f"{k}={v:.4f}" for k, v in div.items()))
    return 0


def _load(args: argparse.Namespace) -> int:
    data = _read(args.file)
    path = Path(args.file).resolve()
    print(f"{args.file}: valid baseline for {', '.join(sorted(data['models'])) or 'no models'}")
    print("To compare against it, start the proxy with it as monitors.baseline_file, e.g.:")
    print(f"  config file:  monitors: {{baseline_file: {path}}}")
    print(f"  environment:  ENTROPY_PROXY_MONITORS__BASELINE_FILE={path}")
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("baseline", help="baselines: pin, list, show (shared store); save, load (files)")
    sub = p.add_subparsers(dest="baseline_command", required=True)
    s = sub.add_parser("save", help="fetch the running proxy's baselines into FILE")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--url", default="http://127.0.0.1:8080", help="the running proxy")
    s.add_argument("--api-key", default=None, help="a key of the proxy's api_keys/admin_keys, if set")
    s.set_defaults(func=_save)
    sh = sub.add_parser("show", help="print a saved baseline file, or (--model) a baseline of the shared store")
    sh.add_argument("file", metavar="FILE", nargs="?")
    store_cli.add_store_options(sh)
    sh.set_defaults(func=lambda args: store_cli.show(args, _show))
    ld = sub.add_parser("load", help="check a baseline file and print how to use it")
    ld.add_argument("file", metavar="FILE")
    ld.set_defaults(func=_load)
    store_cli.add_parsers(sub)
