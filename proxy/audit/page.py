"""``GET /audit`` as one self-contained HTML document: inline CSS and SVG, no script, no external resources.

Confident-but-wrong responses come first. Every generated token is a ``<span class="tok">`` whose background is
shaded by its entropy (white at 0 nats, full red at ``SHADE_MAX`` nats and above); hovering shows the entropy, the
sampled token's probability and the top alternatives (``title`` plus a CSS tooltip from ``data-tip``). Without
``store_text`` the token strings are not stored, so positions render as ``·`` with the same shading and numbers.

The ``#state`` section shows each model's diagnosed entropy state (``healthy | recognition | collapse | drift``, or
``unknown`` while a baseline or a window's volume is missing) with the evidence behind it, and the recognition
probe's stored results per model; a response the probe re-scored carries its ratio and self-check (``.probe``).
"""

from __future__ import annotations

import json
from html import escape
from typing import Any
from urllib.parse import urlencode

from monitors.calibration import ReliabilityBin
from proxy.audit.report import Report, fmt, label_of, probe_text, when
from proxy.semantic.render import ranking_html, semantic_html

SHADE_MAX = 3.0  # nats at which the shading saturates
MAX_TOKENS_SHOWN = 4000
FLAGS = ("confident", "uncertain", "forking_heavy", "truncated_tail", "confident_inconsistent")
LABEL_CHOICES = ("correct", "incorrect", "unlabelled")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
header{background:#1f2a44;color:#fff;padding:12px 20px}header h1{font-size:18px;margin:0}
main{padding:16px 20px;max-width:1200px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:12px 16px;margin-bottom:16px}
h2{font-size:16px;margin:0 0 8px}form.filters label{margin-right:12px}
table.cal td{padding:2px 12px 2px 0}.muted{color:#6b7280}
.resp{border-top:1px solid #eceef2;padding:10px 0}.resp:first-of-type{border-top:0}
.meta{font-size:12px;color:#4b5563;margin-bottom:4px}.meta b{color:#1d2430}
.flag{display:inline-block;background:#eef2ff;color:#3730a3;border-radius:3px;padding:0 5px;margin-right:3px}
.label-incorrect{color:#b91c1c;font-weight:600}.label-correct{color:#15803d;font-weight:600}
.tokens{font:13px/1.9 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-word}
.tok{position:relative;border-radius:2px;padding:1px 0;cursor:default}
.tok:hover{outline:1px solid #1f2a44}
.tok:hover::after{content:attr(data-tip);position:absolute;left:0;top:1.7em;z-index:10;white-space:pre;
 background:#1f2a44;color:#fff;font-size:11px;line-height:1.35;padding:4px 6px;border-radius:3px}
.prompt{font-size:12px;color:#4b5563;white-space:pre-wrap;max-height:6em;overflow:auto;margin:4px 0}
.state{display:inline-block;border-radius:3px;padding:0 6px;font-weight:600;color:#fff;background:#6b7280}
.state-healthy{background:#15803d}.state-recognition{background:#1d4ed8}.state-collapse{background:#b91c1c}
.state-drift{background:#b45309}.model-state{margin:4px 0 10px}.model-state ul{margin:2px 0 0 18px;padding:0}
.probe{font-size:12px;color:#1e3a8a;margin-bottom:4px}
.semantic{font-size:12px;color:#3f3f46;margin-top:4px}.semantic ul{margin:2px 0 0 18px;padding:0}
.legend{display:inline-block;width:160px;height:10px;vertical-align:middle;
 background:linear-gradient(to right,rgba(220,38,38,0.03),rgba(220,38,38,0.85))}
"""


def _shade(h: float) -> str:
    a = 0.03 + 0.82 * min(max(h, 0.0), SHADE_MAX) / SHADE_MAX
    return f"rgba(220,38,38,{a:.3f})"


def _tip(h: float, p: float | None, alts: list[Any]) -> str:
    lines = [f"entropy {h:.3f} nats", f"probability {fmt(p)}"]
    if alts:
        lines.append("top alternatives:")
        for tok, prob in alts[:5]:
            shown = "·" if tok is None else json.dumps(tok, ensure_ascii=False)
            lines.append(f"  {shown} {fmt(prob)}")
    return "\n".join(lines)


def render_tokens(r: dict[str, Any]) -> str:
    entropies: list[float] = r.get("entropies") or []
    probs: list[float] = r.get("token_probs") or []
    alts: list[Any] = r.get("alternatives") or []
    tokens: list[str] | None = r.get("tokens")
    parts = []
    for i, h in enumerate(entropies[:MAX_TOKENS_SHOWN]):
        p = probs[i] if i < len(probs) else None
        tip = _tip(h, p, alts[i] if i < len(alts) else [])
        text = tokens[i] if tokens is not None and i < len(tokens) else "·"
        parts.append(
            f'<span class="tok" style="background:{_shade(h)}" data-entropy="{h:.4f}" '
            f'data-tip="{escape(tip)}" title="{escape(tip)}">{escape(text)}</span>'
        )
    if len(entropies) > MAX_TOKENS_SHOWN:
        parts.append(f'<span class="muted"> … {len(entropies) - MAX_TOKENS_SHOWN} more tokens</span>')
    return "".join(parts)


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt)
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)


def render_response(r: dict[str, Any], css_class: str = "resp") -> str:
    label = label_of(r)
    flags = "".join(f'<span class="flag">{escape(f)}</span>' for f in r["flags"]) or '<span class="muted">-</span>'
    note = f' · note: {escape(str(r["note"]))}' if r.get("note") else ""
    prompt = ""
    if r.get("prompt") is not None:
        prompt = f'<div class="prompt">{escape(_prompt_text(r["prompt"]))}</div>'
    rid = escape(r["response_id"])
    return (
        f'<div class="{css_class}" data-id="{rid}" data-label="{label}">'
        f'<div class="meta"><b class="rid">{rid}</b>{" #" + str(r["choice_index"]) if r["choice_index"] else ""}'
        f' · {when(r["created"])} UTC · {escape(r["model"])} · {escape(r["endpoint"])} · {flags}'
        f' · mean {fmt(r["mean_entropy"])} nats · confidence {fmt(r["confidence"])}'
        f' · <span class="label-{label}">{label}</span>{note}</div>'
        f'{prompt}{_probe_lines(r.get("probe") or [])}<div class="tokens">{render_tokens(r)}</div>'
        f"{semantic_html(r)}</div>"
    )


def _probe_lines(results: list[dict[str, Any]]) -> str:
    return "".join(
        f'<div class="probe" data-ratio="{"" if p.get("ratio") is None else p["ratio"]}" '
        f'data-selfcheck="{"" if p.get("selfcheck_abs_diff") is None else p["selfcheck_abs_diff"]}">'
        f"recognition probe ({when(p['created'])} UTC): {escape(probe_text(p))}</div>"
        for p in results
    )


def render_states(report: Report) -> str:
    """Each model's live state with its evidence, then the stored probe results per model."""
    parts = []
    for model, st in report.states.items():
        state = str(st.get("state") or "unknown")
        ratio, rise = st.get("recognition_ratio"), st.get("recognition_rise")
        reasons = "".join(f"<li>{escape(str(x))}</li>" for x in st.get("diagnosis") or [])
        parts.append(
            f'<div class="model-state" data-model="{escape(model)}" data-state="{escape(state)}">'
            f'<b>{escape(model)}</b> <span class="state state-{escape(state)}">{escape(state)}</span>'
            f' <span class="muted">· recognition ratio {fmt(ratio)} · rise {fmt(rise)}</span>'
            f"<ul>{reasons}</ul></div>"
        )
    if not parts:
        parts.append('<p class="muted">No live state: the monitors are not running in this process, '
                     "or have seen no traffic yet.</p>")
    rows = "".join(
        f"<tr><td>{escape(s['model'])}</td><td>{s['results']}</td><td>{s['pairs']}</td><td>{fmt(s['ratio'])}</td>"
        f"<td>{fmt(s['selfcheck_abs_diff'], 4)}</td></tr>"
        for s in report.probe_summary
    )
    if rows:
        parts.append(
            '<table class="cal probe-summary"><tr><th>model</th><th>probe results</th><th>pairs</th>'
            "<th>ratio H<sub>off</sub>/H<sub>on</sub></th><th>self-check (nats)</th></tr>" + rows + "</table>"
        )
    return "".join(parts)


def reliability_svg(bins: tuple[ReliabilityBin, ...], size: int = 260) -> str:
    pad = 34
    w = size - pad - 8

    def x(v: float) -> float:
        return pad + v * w

    def y(v: float) -> float:
        return 8 + (1 - v) * w

    el = [f'<svg class="reliability" xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" '
          f'role="img" aria-label="reliability diagram">',
          f'<rect x="{pad}" y="8" width="{w}" height="{w}" fill="#fafafa" stroke="#ccc"/>',
          f'<line x1="{x(0)}" y1="{y(0)}" x2="{x(1)}" y2="{y(1)}" stroke="#999" stroke-dasharray="4 3"/>']
    for b in bins:
        if b.count and b.accuracy is not None:
            el.append(
                f'<rect class="bin" x="{x(b.lo):.1f}" y="{y(b.accuracy):.1f}" width="{w * (b.hi - b.lo) - 1:.1f}" '
                f'height="{w * b.accuracy:.1f}" fill="#4f7cc9" fill-opacity="0.8">'
                f"<title>[{b.lo:.1f}, {b.hi:.1f}): n={b.count}, confidence {fmt(b.confidence)}, "
                f"accuracy {fmt(b.accuracy)}</title></rect>"
            )
            if b.confidence is not None:
                el.append(f'<circle cx="{x(b.confidence):.1f}" cy="{y(b.accuracy):.1f}" r="3" fill="#c0392b"/>')
    for t in (0.0, 0.5, 1.0):
        el.append(f'<text x="{x(t):.0f}" y="{size - 12}" font-size="10" text-anchor="middle">{t:g}</text>')
        el.append(f'<text x="{pad - 4}" y="{y(t) + 3:.0f}" font-size="10" text-anchor="end">{t:g}</text>')
    el.append(f'<text x="{x(0.5):.0f}" y="{size - 1}" font-size="10" text-anchor="middle">confidence</text>')
    el.append(f'<text x="9" y="{y(0.5):.0f}" font-size="10" transform="rotate(-90 9 {y(0.5):.0f})" '
              'text-anchor="middle">accuracy</text></svg>')
    return "".join(el)


def _select(name: str, options: list[str], current: str | None) -> str:
    opts = ['<option value="">all</option>'] + [
        f'<option value="{escape(o)}"{" selected" if o == current else ""}>{escape(o)}</option>' for o in options
    ]
    return f'<label>{name} <select name="{name}">{"".join(opts)}</select></label>'


def _canary(report: Report) -> str:
    from proxy.canary.render import canary_html  # imported here: proxy.canary imports the audit store

    return canary_html(report.canary)


def render_page(report: Report) -> str:
    f = report.filters
    cal = report.calibration
    filters = (
        f'<form class="filters" method="get" action="audit">{_select("model", report.models, f.model)}'
        f'{_select("flag", list(FLAGS), f.flag)}{_select("label", list(LABEL_CHOICES), f.label)}'
        '<button type="submit">filter</button></form>'
    )
    wrong = "".join(render_response(r, "resp confident-wrong") for r in report.confident_wrong)
    rest = "".join(render_response(r) for r in report.responses)
    active = {k: v for k, v in (("model", f.model), ("flag", f.flag), ("label", f.label)) if v}
    cal_rows = [
        ("labelled responses", f"{cal.n} ({cal.positives} correct)"),
        ("Brier score", fmt(cal.brier, 4)),
        ("ECE (10 bins)", fmt(cal.ece, 4)),
        ("AUROC", fmt(cal.auroc, 4)),
        ("saturation (confidence ≥ 0.99)", fmt(cal.saturation, 4)),
    ]
    cal_table = "".join(f"<tr><td>{k}</td><td><b>{v}</b></td></tr>" for k, v in cal_rows)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>entropy-proxy audit</title><style>{CSS}</style></head>
<body><header><h1>entropy-proxy · audit trail</h1></header><main>
<section>{filters}<div class="muted">{report.total} responses recorded
{escape(("· filtered by " + urlencode(active)) if active else "")} · token shading: 0
<span class="legend"></span> {SHADE_MAX:g}+ nats (hover a token for details)</div></section>
<section id="state"><h2>Entropy state per model</h2>{render_states(report)}</section>
<section id="canary"><h2>Canary rounds</h2>{_canary(report)}</section>
<section id="confident-wrong"><h2>Confident but wrong ({len(report.confident_wrong)})</h2>
{wrong or '<p class="muted">No response flagged confident has been labelled incorrect.</p>'}</section>
<section id="calibration"><h2>Calibration of confidence against feedback</h2>
<div style="display:flex;gap:24px;align-items:flex-start"><table class="cal">{cal_table}</table>
{reliability_svg(cal.bins)}</div>{ranking_html(report.scores)}</section>
<section id="responses"><h2>Recorded responses ({len(report.responses)} shown, most recent first)</h2>
{rest or '<p class="muted">Nothing recorded for these filters.</p>'}</section>
</main></body></html>
"""
