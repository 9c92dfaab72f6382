"""``entropy-proxy baseline pin|unpin|list|show`` on the shared store (the audit store of ``--config``/``--store``).

- ``list [--model M]``: every stored baseline, one line each; ``*`` marks the one in use (pinned over auto);
- ``show --model M [--revision R]``: one baseline's measures (the one in use for R; R defaults to the newest);
- ``pin --model M [--revision R]``: pin the automatic baseline of (M, R) (R defaults to the newest auto one);
- ``pin --model M --revision R --file FILE``: pin model M's entry of a file written by ``baseline save``;
- ``unpin --model M --revision R``: drop the pin; replicas go back to the automatic baseline at their next poll.

Running replicas pick a change up within ``monitors.baseline_poll_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from proxy.audit.store import AuditStore, StoreError
from proxy.cli_audit import start_or_report
from proxy.settings import SettingsError, load_settings

from .model import Baseline
from .store import BaselineStore, effective


def add_store_options(sp: argparse.ArgumentParser, *, model_required: bool = False) -> None:
    sp.add_argument("--config", help="YAML config file (its audit.url is the store)")
    sp.add_argument("--store", help="store URL (default: audit.url from the config)")
    sp.add_argument("--model", required=model_required, help="the model's metric label")
    sp.add_argument("--revision", help="the model revision")


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _url(args: argparse.Namespace) -> str:
    if args.store:
        return str(args.store)
    return load_settings({"upstream": "http://unused.invalid"}, config_file=args.config).audit.url


def run(args: argparse.Namespace) -> int:
    try:
        url = _url(args)
        store = AuditStore(url)
    except (SettingsError, StoreError) as e:
        print(f"entropy-proxy: {e}", file=sys.stderr)
        return 2
    return asyncio.run(_run(args, store))


async def _run(args: argparse.Namespace, store: AuditStore) -> int:
    if not await start_or_report(store):
        return 1
    try:
        bs = BaselineStore(store)
        return int(await {"list": _list, "show": _show, "pin": _pin, "unpin": _unpin}[args.baseline_command](
            args, bs))
    finally:
        await store.close()


async def _list(args: argparse.Namespace, bs: BaselineStore) -> int:
    rows = await bs.all(model=args.model, revision=args.revision)
    if not rows:
        print("no baselines stored")
        return 0
    in_use = {(b.model, b.revision, b.source) for b in effective(rows).values()}
    print(f"  {'model':<20} {'revision':<28} {'source':<7} {'created':<24} {'tokens':>8} {'responses':>9}")
    for b in rows:
        mark = "*" if (b.model, b.revision, b.source) in in_use else " "
        print(f"{mark} {b.model:<20} {b.revision:<28} {b.source:<7} {_when(b.created):<24} {b.tokens:>8} "
              f"{b.responses:>9}")
    return 0


async def _pick(bs: BaselineStore, model: str, revision: str | None, source: str | None = None) -> Baseline | None:
    rows = await bs.all(model=model, revision=revision)
    if source is not None:
        rows = [b for b in rows if b.source == source]
    if not rows:
        return None
    if revision is None:
        revision = max(rows, key=lambda b: b.created).revision
    return effective([b for b in rows if b.revision == revision]).get((model, revision))


async def _show(args: argparse.Namespace, bs: BaselineStore) -> int:
    b = await _pick(bs, args.model, args.revision)
    if b is None:
        print(f"baseline show: no baseline stored for model {args.model!r}"
              + (f" revision {args.revision!r}" if args.revision else ""), file=sys.stderr)
        return 1
    print(f"model {b.model} revision {b.revision}: {b.source}, created {_when(b.created)}, "
          f"{b.tokens} tokens, {b.responses} responses")
    if b.note:
        print(f"  note: {b.note}")
    thr = b.forking_threshold
    print(f"  forking_threshold (fixed): {'n/a' if thr is None else f'{thr:.5f}'}")
    for k, v in b.measures().items():
        n = b.diversity_samples.get(k)
        print(f"  {k:<22} {v:.5f}" + (f"   ({n} responses)" if n is not None else ""))
    return 0


async def _pin(args: argparse.Namespace, bs: BaselineStore) -> int:
    if args.file:
        if not args.revision:
            print("baseline pin: --revision is needed with --file (the revision the file is to stand for)",
                  file=sys.stderr)
            return 2
        try:
            data = json.loads(Path(args.file).read_text())
            entry = (data.get("models") or {}).get(args.model)
            if not isinstance(entry, dict):
                raise ValueError(f"no entry for model {args.model!r}")
            b = Baseline.from_file_entry(args.model, args.revision, "pinned", entry)
        except (OSError, ValueError) as e:
            print(f"baseline pin: {args.file}: {e}", file=sys.stderr)
            return 1
        origin = args.file
    else:
        auto = await _pick(bs, args.model, args.revision, source="auto")
        if auto is None:
            print(f"baseline pin: no automatic baseline stored for model {args.model!r}"
                  + (f" revision {args.revision!r}" if args.revision else ""), file=sys.stderr)
            return 1
        b, origin = auto, f"the automatic baseline of {_when(auto.created)}"
    b.created = time.time()
    if args.note:
        b.note = args.note
    await bs.pin(b)
    print(f"pinned model {b.model} revision {b.revision} from {origin}; replicas use it at their next poll")
    return 0


async def _unpin(args: argparse.Namespace, bs: BaselineStore) -> int:
    if not args.revision:
        print("baseline unpin: --revision is needed", file=sys.stderr)
        return 2
    if not await bs.delete(args.model, args.revision, "pinned"):
        print(f"baseline unpin: no pinned baseline for {args.model} revision {args.revision}", file=sys.stderr)
        return 1
    print(f"unpinned model {args.model} revision {args.revision}")
    return 0


def add_parsers(sub: Any) -> None:
    """Register list/pin/unpin; ``show`` is shared with the file form (``show FILE``), dispatched by ``show``."""
    ls = sub.add_parser("list", help="baselines in the shared store (* = in use)")
    add_store_options(ls)
    ls.set_defaults(func=run)
    pin = sub.add_parser("pin", help="pin a baseline for (model, revision): the auto one, or from a saved file")
    add_store_options(pin, model_required=True)
    pin.add_argument("--file", help="a file written by `baseline save`: pin its entry for --model")
    pin.add_argument("--note", help="why (kept with the baseline)")
    pin.set_defaults(func=run)
    unpin = sub.add_parser("unpin", help="drop the pin of (model, revision): back to the automatic baseline")
    add_store_options(unpin, model_required=True)
    unpin.set_defaults(func=run)


def show(args: argparse.Namespace, show_file: Any) -> int:
    if args.file:
        return int(show_file(args))
    if not args.model:
        print("baseline show: give FILE, or --model (and --revision) for the shared store", file=sys.stderr)
        return 2
    return run(args)
