"""The ``entropy-proxy`` command: serve, demo, audit, baseline."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from .settings import SettingsError, load_settings

# Sub-commands provided by other modules: (module, attribute) of a function add_parser(subparsers).
_SUBCOMMANDS = (("proxy.cli_audit", "add_parser"), ("proxy.cli_baseline", "add_parser"))


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(
            {"upstream": args.upstream, "host": args.host, "port": args.port}, config_file=args.config
        )
    except SettingsError as e:
        print(f"entropy-proxy: configuration error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every upstream request at INFO: a per-request cost, and URLs have no place in the proxy's log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=30,
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="entropy-proxy", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the proxy in front of an OpenAI-compatible upstream (vLLM)")
    s.add_argument("--upstream", help="upstream base URL, e.g. http://127.0.0.1:8000 (env ENTROPY_PROXY_UPSTREAM)")
    s.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port to listen on (default 8080)")
    s.add_argument("--config", help="YAML config file (env ENTROPY_PROXY_CONFIG)")
    s.set_defaults(func=_serve)
    d = sub.add_parser("demo", help="start a local vLLM on CPU with SmolLM2, the proxy in front, and ask it things")
    d.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the demo (see entropy-proxy demo -h)")
    d.set_defaults(func=_demo)
    for module, attr in _SUBCOMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        getattr(mod, attr)(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
