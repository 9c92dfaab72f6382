"""The canary's prompt set: the default shipped with the proxy, plus (or instead of) a user file (YAML or JSON).

A prompt: ``id`` (unique), ``kind`` (``open`` | ``check`` | ``format``), ``prompt`` (a user message) or
``messages`` (a chat list), optionally ``answer`` (accepted answers, for ``check``: whole-word, case-insensitive),
``format`` (for ``format``: the label :func:`monitors.formats.classify_format` must give), ``reference`` (a fixed
answer written by a person: the recognition ratio's foreign text; prompts without one give no ratio) and
``max_tokens``. The user file has ``prompts:`` (same shape; an ``id`` equal to a default's replaces it),
``include_default:`` (default true) and ``models: {name: [prompts]}`` for prompts asked of one model only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from monitors.formats import FORMATS, classify_format

DEFAULT_FILE = Path(__file__).with_name("default_prompts.yaml")
KINDS = ("open", "check", "format")
MAX_PROMPTS = 64


class PromptError(ValueError):
    """A prompt file is unreadable or malformed; the message names the prompt and field."""


@dataclass(frozen=True, slots=True)
class Prompt:
    id: str
    kind: str
    messages: tuple[dict[str, str], ...]
    answers: tuple[str, ...] = ()
    format: str | None = None
    reference: str | None = None
    max_tokens: int | None = None
    _patterns: tuple[re.Pattern[str], ...] = field(default=(), repr=False, compare=False)

    @property
    def checkable(self) -> bool:
        return bool(self.answers) or self.format is not None

    def check(self, text: str, finish_reason: str | None = None) -> bool | None:
        """Whether a sample is correct; None for a prompt that cannot be checked."""
        if self.format is not None:
            return classify_format(text, finish_reason) == self.format
        if not self.answers:
            return None
        return any(p.search(text) for p in self._patterns)

    def with_system(self, system: str | None) -> list[dict[str, str]]:
        msgs = [dict(m) for m in self.messages]
        return [{"role": "system", "content": system}, *msgs] if system else msgs


def _pattern(answer: str) -> re.Pattern[str]:
    # Whole word, and for a number not part of a longer number or a decimal ("42" in "420" or "4.2" does not count).
    return re.compile(r"(?<![\w.])" + re.escape(answer) + r"(?![\w]|\.\d)", re.IGNORECASE)


def _prompt(raw: Any, where: str) -> Prompt:
    if not isinstance(raw, dict):
        raise PromptError(f"{where}: must be a mapping")
    pid = raw.get("id")
    if not isinstance(pid, str) or not pid.strip():
        raise PromptError(f"{where}.id: a non-empty string is required")
    where = f"{where} ({pid})"
    kind = raw.get("kind", "open")
    if kind not in KINDS:
        raise PromptError(f"{where}.kind: one of {', '.join(KINDS)}")
    if "messages" in raw:
        msgs = raw["messages"]
        if not (isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs)):
            raise PromptError(f"{where}.messages: a list of {{role, content}} with string values")
        messages = tuple({"role": m["role"], "content": m["content"]} for m in msgs)
    elif isinstance(raw.get("prompt"), str) and raw["prompt"].strip():
        messages = ({"role": "user", "content": raw["prompt"]},)
    else:
        raise PromptError(f"{where}: needs `prompt` (a string) or `messages`")
    answers = raw.get("answer", [])
    answers = [answers] if isinstance(answers, (str, int, float)) else answers
    if not isinstance(answers, list) or not all(isinstance(a, (str, int, float)) for a in answers):
        raise PromptError(f"{where}.answer: a string or a list of strings")
    fmt = raw.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise PromptError(f"{where}.format: one of {', '.join(FORMATS)}")
    if kind == "check" and not answers:
        raise PromptError(f"{where}.answer: a `check` prompt needs its accepted answers")
    if kind == "format" and fmt is None:
        raise PromptError(f"{where}.format: a `format` prompt needs the expected format")
    ref = raw.get("reference")
    if ref is not None and (not isinstance(ref, str) or not ref.strip()):
        raise PromptError(f"{where}.reference: a non-empty string")
    mt = raw.get("max_tokens")
    if mt is not None and (not isinstance(mt, int) or isinstance(mt, bool) or not 1 <= mt <= 4096):
        raise PromptError(f"{where}.max_tokens: an integer 1..4096")
    strs = tuple(str(a) for a in answers)
    return Prompt(pid, kind, messages, strs, fmt, ref, mt, tuple(_pattern(a) for a in strs))


def _read(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as e:
        raise PromptError(f"cannot read {path}: {e.strerror}") from None
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise PromptError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                          f"{str(e).splitlines()[0]}") from None


def _list(raw: Any, where: str) -> list[Prompt]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise PromptError(f"{where}: must be a list of prompts")
    return [_prompt(p, f"{where}[{i}]") for i, p in enumerate(raw)]


def _merge(base: list[Prompt], extra: list[Prompt]) -> list[Prompt]:
    out = {p.id: p for p in base}
    for p in extra:
        out[p.id] = p
    if len(out) > MAX_PROMPTS:
        raise PromptError(f"at most {MAX_PROMPTS} prompts per model (each one costs tokens every round)")
    return list(out.values())


@dataclass(frozen=True, slots=True)
class PromptSet:
    common: tuple[Prompt, ...]
    per_model: dict[str, tuple[Prompt, ...]]

    def for_model(self, model: str) -> list[Prompt]:
        return _merge(list(self.common), list(self.per_model.get(model, ())))


def load_prompts(user_file: str | None = None) -> PromptSet:
    """The default set, merged with ``user_file`` when given; raises :class:`PromptError`."""
    default = _read(DEFAULT_FILE)
    common = _list(default.get("prompts"), "default prompts")
    per_model: dict[str, tuple[Prompt, ...]] = {}
    if user_file:
        data = _read(Path(user_file))
        if not isinstance(data, dict):
            raise PromptError(f"{user_file}: must hold a mapping with `prompts`")
        keep = data.get("include_default", True)
        if not isinstance(keep, bool):
            raise PromptError("include_default: true or false")
        common = _merge(common if keep else [], _list(data.get("prompts"), "prompts"))
        models = data.get("models") or {}
        if not isinstance(models, dict):
            raise PromptError("models: a mapping of model name to a list of prompts")
        per_model = {str(m): tuple(_list(ps, f"models.{m}")) for m, ps in models.items()}
    ids = [p.id for p in common]
    if len(ids) != len(set(ids)):
        raise PromptError("prompt ids must be unique")
    if not common and not any(per_model.values()):
        raise PromptError("no prompts: the canary needs at least one")
    return PromptSet(tuple(common), per_model)
