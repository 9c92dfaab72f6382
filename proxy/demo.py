"""``entropy-proxy demo``: a local vLLM (CPU, SmolLM2-135M-Instruct), the proxy in front, three questions.

For each answer it prints the ``entropy`` summary and the answer's tokens coloured by their entropy, then
stops everything it started. ``--upstream URL`` uses a running OpenAI-compatible server instead of vLLM.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import httpx

from .localvllm import LocalVLLM, VLLMStartError, die_with_parent, free_port

QUESTIONS = (
    "What is the capital of France?",
    "Write a two-line poem about the sea.",
    "Pick a random number between 1 and 100 and say why you picked it.",
)

# (upper bound in nats, ANSI 256-colour background): pale green for near-certain tokens, red where the model
# forks. Black text on light backgrounds reads on dark and light terminals alike, and shows whitespace tokens.
SCALE = ((0.1, 194), (0.5, 150), (1.0, 229), (2.0, 222), (3.0, 209), (math.inf, 203))
NOT_SETTINGS = ("ENTROPY_PROXY_VLLM_", "ENTROPY_PROXY_TEST_")
PLAIN_MARK = 2.0  # without colour, only tokens at or above this many nats get their value written out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="entropy-proxy demo", description=__doc__.splitlines()[0])
    p.add_argument(
        "--upstream",
        help="use this OpenAI-compatible server (e.g. http://127.0.0.1:8000) instead of "
        "starting a local vLLM",
    )
    p.add_argument("--port", type=int, default=0, help="proxy port (default: a free one)")
    p.add_argument(
        "--question", "-q", action="append", dest="questions", help="ask this instead (repeatable)"
    )
    p.add_argument("--max-tokens", type=int, default=80)
    p.add_argument("--temperature", type=float, default=0.3)
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    p.add_argument(
        "--keep-running",
        action="store_true",
        help="after the questions, keep the proxy (and vLLM) up until Ctrl-C",
    )
    p.add_argument(
        "--torch-compile",
        action="store_true",
        help="torch.compile the model: ~25%% more throughput, 1-3 minutes longer start-up",
    )
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for vLLM")
    return p


def use_color(mode: str, stream: TextIO) -> bool:
    if mode != "auto":
        return mode == "always"
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return hasattr(stream, "isatty") and stream.isatty()


def _paint(text: str, colour: int | None, color: bool, bold: bool = False) -> str:
    if not color or (colour is None and not bold):
        return text
    codes = (["1"] if bold else []) + ([f"38;5;16;48;5;{colour}"] if colour is not None else [])
    on, off = f"\x1b[{';'.join(codes)}m", "\x1b[0m"
    # A newline inside a painted span drags the background across the line: paint each line, mark the break.
    return "\n".join(f"{on}{part}{off}" if part else "" for part in text.replace("\n", "↵\n").split("\n"))


def colour_for(h: float | None) -> int | None:
    if h is None or not math.isfinite(h):
        return None
    return next(c for bound, c in SCALE if h < bound)


def legend(color: bool) -> str:
    if not color:
        return f"token entropy (nats): ⟨h⟩ follows each token above {PLAIN_MARK:g} nats"
    parts, lower = [], 0.0
    for bound, c in SCALE:
        label = f"{lower:g}+" if math.isinf(bound) else f"{lower:g}-{bound:g}"
        parts.append(_paint(f" {label} ", c, color))
        lower = bound
    return "token entropy (nats): " + " ".join(parts)


def heat_map(tokens: Sequence[str], per_token: Sequence[float | None], color: bool) -> str:
    """The tokens in order, painted by entropy; without colour, ``token⟨h⟩`` marks the high-entropy ones."""
    out = []
    for i, tok in enumerate(tokens):
        h = per_token[i] if i < len(per_token) else None
        if color:
            out.append(_paint(tok, colour_for(h), True))
        elif h is not None and h >= PLAIN_MARK:
            body = tok.rstrip("\n")  # the mark stays on the token's line
            out.append(f"{body}⟨{h:.1f}⟩{tok[len(body) :]}")
        else:
            out.append(tok)
    return "".join(out)


def summary_line(ent: dict[str, Any] | None) -> str:
    if not ent:
        return "entropy: not available (the upstream returned no logprobs)"
    flags = ",".join(ent.get("flags") or []) or "-"
    return (
        f"entropy: mean {ent['mean']:.3f} nats [{ent['mean_lower']:.3f}, {ent['mean_upper']:.3f}]"
        f"  confidence {ent['confidence']:.3f}  flags {flags}"
        f"  forking {ent['forking_fraction']:.0%} ({ent['forking_tokens']}/{ent['tokens']} tokens)"
    )


def render(question: str, body: dict[str, Any], color: bool) -> str:
    choice = body["choices"][0]
    answer = (choice.get("message") or {}).get("content") or ""
    ent = choice.get("entropy")
    lines = [_paint(f"Q: {question}", None, color, bold=True), f"A: {answer.strip()}", summary_line(ent)]
    content = (choice.get("logprobs") or {}).get("content") or []
    if ent and content:
        lines.append("tokens: " + heat_map([c["token"] for c in content], ent.get("per_token") or [], color))
    return "\n".join(lines)


@contextlib.contextmanager
def run_proxy(upstream: str, port: int, log: Path, timeout: float = 60.0) -> Iterator[str]:
    """``entropy-proxy serve`` as a child process; yields its base URL once ``/readyz`` answers 200."""
    cmd = [sys.executable, "-m", "proxy.cli", "serve", "--upstream", upstream, "--port", str(port)]
    # ENTROPY_PROXY_VLLM_* and ENTROPY_PROXY_TEST_* are not proxy settings; the proxy rejects unknown keys.
    env = {k: v for k, v in os.environ.items() if not k.startswith(NOT_SETTINGS)}
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),  # uvicorn stops cleanly on SIGTERM
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5.0) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"the proxy exited with code {proc.returncode}; log {log}:\n{_tail(log)}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url + "/readyz").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the proxy was not ready after {timeout:.0f} s; log {log}:\n{_tail(log)}"
                    )
                time.sleep(0.3)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=35)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def ask(
    client: httpx.Client, proxy: str, model: str, question: str, args: argparse.Namespace
) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        # Token strings come back only with logprobs; one alternative each keeps the answer small.
        "logprobs": True,
        "top_logprobs": 1,
    }
    r = client.post(proxy + "/v1/chat/completions", json=body, headers={"X-Entropy-Detail": "tokens"})
    if r.status_code != 200:
        raise RuntimeError(f"the proxy answered {r.status_code}: {r.text[:500]}")
    result: dict[str, Any] = r.json()
    return result


def _session(args: argparse.Namespace, upstream: str, logs: Path, out: TextIO) -> None:
    color = use_color(args.color, out)
    port = args.port or free_port()
    with run_proxy(upstream, port, logs / "proxy.log") as proxy, httpx.Client(timeout=300.0) as client:
        print(f"proxy ready at {proxy} (in front of {upstream})", file=out)
        models = client.get(proxy + "/v1/models").json()["data"]
        model = models[0]["id"]
        print(legend(color), file=out)
        for q in args.questions or QUESTIONS:
            print(file=out)
            started = time.monotonic()
            body = ask(client, proxy, model, q, args)
            print(render(q, body, color), file=out)
            print(f"({time.monotonic() - started:.1f} s)", file=out, flush=True)
        print(
            f"\nmetrics: {proxy}/metrics   audit: {proxy}/audit   status: {proxy}/v1/entropy/status", file=out
        )
        if args.keep_running:
            print(
                "running; Ctrl-C stops the proxy" + ("" if args.upstream else " and vLLM"),
                file=out,
                flush=True,
            )
            while True:
                time.sleep(3600)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = sys.stdout
    # A SIGTERM (make, systemd, a CI runner) must stop vLLM and the proxy too, like Ctrl-C does.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main else None
    logs = Path(tempfile.mkdtemp(prefix="entropy-proxy-demo-"))
    try:
        with contextlib.ExitStack() as stack:
            upstream = args.upstream
            if not upstream:
                vllm = LocalVLLM(
                    log_path=logs / "vllm.log",
                    startup_timeout=args.startup_timeout,
                    torch_compile=args.torch_compile,
                )
                print(
                    f"starting vLLM (SmolLM2-135M on CPU, under a minute; log {vllm.log_path}) ...",
                    file=out,
                    flush=True,
                )
                stack.enter_context(vllm)
                print(f"vLLM ready at {vllm.base_url} after {vllm.ready_after:.0f} s", file=out, flush=True)
                upstream = vllm.base_url
            _session(args, upstream, logs, out)
        print("stopped.", file=out)
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopped.", file=out)
        return 130
    except (VLLMStartError, RuntimeError, httpx.HTTPError) as e:
        print(f"entropy-proxy demo: {e}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
