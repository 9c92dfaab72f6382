"""One settings object, read once at start-up.

Sources, later ones winning: built-in defaults < YAML file (``--config``) < environment
(``ENTROPY_PROXY_<KEY>``, nested keys joined by ``__``, e.g. ``ENTROPY_PROXY_THRESHOLDS__CONFIDENT_MEAN``)
< command-line flags. A missing or bad value raises :class:`SettingsError` whose message is one line naming
the key. Every key is documented in ``docs/configuration.md``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "ENTROPY_PROXY_"


class SettingsError(ValueError):
    """A configuration value is missing or invalid; ``str(err)`` is one line naming the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Thresholds(_Section):
    confident_mean: float = Field(0.3, ge=0, description="flag `confident` when the mean entropy is at most this")
    uncertain_mean: float = Field(1.5, ge=0, description="flag `uncertain` when the mean entropy is at least this")
    low_confidence_prob: float = Field(0.1, ge=0, le=1, description="a token below this probability is low-confidence")
    forking: float | Literal["adaptive"] = Field(
        "adaptive", description="forking-token entropy cut-off in nats, or `adaptive` (rolling 80th percentile)"
    )
    forking_heavy_fraction: float = Field(0.35, ge=0, le=1, description="flag `forking_heavy` above this fraction")
    tail_mass: float = Field(0.25, ge=0, le=1, description="flag `truncated_tail` above this mean tail mass")

    @field_validator("forking", mode="before")
    @classmethod
    def _forking(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "adaptive":
            try:
                return float(v)
            except ValueError:
                raise ValueError("must be a number or 'adaptive'") from None
        return v


class AuditSettings(_Section):
    url: str = "sqlite:///./entropy-proxy.db"
    sample_rate: float = Field(0.05, ge=0, le=1)
    store_text: bool = False
    retention_days: int = Field(30, ge=1)
    queue_size: int = Field(10_000, ge=1)
    batch_size: int = Field(200, ge=1)
    enabled: bool = True
    public: bool = Field(False, description="without api_keys/admin_keys, /audit and feedback answer every client")


class MonitorSettings(_Section):
    window: int = Field(2_000, ge=10, description="responses in the sliding window")
    baseline: int = Field(20_000, ge=100, description="tokens that make the start-up baseline")
    collapse_reference: int = Field(400, ge=10, description="responses that make the collapse detector's reference")
    baseline_file: str | None = None
    strategic_grams_file: str | None = None
    baseline_responses: int = Field(400, ge=10, description="responses an automatic baseline needs at least")
    baseline_poll_s: float = Field(30.0, gt=0, description="how often replicas re-read baselines and revisions")
    baseline_store: bool = Field(True, description="keep baselines in the audit store (audit.url) when audit is on")
    evidence_tokens: int = Field(2_000, ge=1, description="tokens in the window before a state other than unknown")
    evidence_responses: int = Field(20, ge=1, description="responses in the window before a state other than unknown")
    text_work_share: float = Field(0.05, ge=0, le=1, description="CPU share of one core the monitors' text work may "
                                   "use; responses beyond it skip the text monitors (counted); 0: no cap")


class ProbeSettings(_Section):
    sample_rate: float = Field(0.0, ge=0, le=1)
    concurrency: int = Field(1, ge=1)
    off_policy_upstream: str | None = None
    off_policy_model: str | None = None


class OtelSettings(_Section):
    """OpenTelemetry export (docs/otel.md); the exporter itself is configured by the standard OTEL_* variables."""

    enabled: bool = Field(False, description="a GenAI span per chat/completions request, exported over OTLP/HTTP")


class CanarySettings(_Section):
    """Fixed prompts sampled off the request path (docs/recognition.md, "Canary")."""

    enabled: bool = False
    interval_s: float = Field(3_600.0, ge=1, description="seconds between rounds")
    samples: int = Field(5, ge=2, le=64, description="samples of each prompt per round (n)")
    temperature: float = Field(1.0, ge=0, le=2)
    prompts_file: str | None = Field(None, description="YAML/JSON prompt set added to (or replacing) the default")
    max_tokens_per_hour: int = Field(20_000, ge=1, description="the canary's sliding-hour token budget")
    max_tokens: int = Field(48, ge=1, le=4096, description="tokens per sample unless a prompt sets its own")


class SemanticSettings(_Section):
    """Semantic entropy by shadow sampling (docs/configuration.md, "semantic"); needs the ``semantic`` extra."""

    sample_rate: float = Field(0.0, ge=0, le=1, description="share of chat requests that get shadow samples; 0: off")
    samples: int = Field(10, ge=2, le=32, description="extra answers per sampled request (n, temperature 1)")
    max_tokens_per_hour: int = Field(20_000, ge=1, description="the shadow samples' sliding-hour token budget")
    max_tokens: int = Field(64, ge=1, le=4096, description="tokens per shadow sample")
    similarity_threshold: float = Field(0.85, gt=0, le=1, description="cosine at which two answers mean the same")
    uncertain_nats: float = Field(1.0, ge=0, description="semantic entropy from which a `confident` response is "
                                  "flagged `confident_inconsistent`")
    model_cache_dir: str | None = Field(None, description="where the packaged embedding model is unpacked")


class ModelSettings(_Section):
    """Per-model facts the upstream may not tell (``models.<name>``); unset fields are learnt where possible."""

    revision: str | None = Field(None, description="the deployed revision; else the upstream's /v1/models `root`")
    vocab_size: int | None = Field(None, ge=2, description="the model's vocabulary size for the entropy bounds")


class Settings(_Section):
    upstream: str
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    top_k: int = Field(20, ge=1, le=1000)
    timeout_s: float = Field(600.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    vocab_size: int = Field(262_144, ge=2, description="used for the entropy upper bound when the model's is unknown")
    models: dict[str, ModelSettings] = Field(
        default_factory=dict,
        description="allow-list for metric labels: a list of names, or a mapping name -> {revision, vocab_size}",
    )
    api_keys: list[str] = Field(default_factory=list, description="keys clients must send; empty: no check")
    upstream_api_key: str | None = Field(None, description="sent upstream as Bearer; else the client's is forwarded")
    admin_keys: list[str] = Field(default_factory=list)
    log_level: str = "info"
    thresholds: Thresholds = Thresholds()
    audit: AuditSettings = AuditSettings()
    monitors: MonitorSettings = MonitorSettings()
    probe: ProbeSettings = ProbeSettings()
    canary: CanarySettings = CanarySettings()
    semantic: SemanticSettings = SemanticSettings()
    otel: OtelSettings = OtelSettings()

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        if not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        # Accept both http://host:8000 and http://host:8000/v1; the proxy appends /v1/... itself.
        if v.endswith("/v1"):
            v = v[: -len("/v1")]
        return v

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, v: Any) -> Any:
        # Kept compatible with the first version's list form (and "a,b" from the environment).
        if isinstance(v, str):
            v = [s.strip() for s in v.split(",") if s.strip()]
        if isinstance(v, list | tuple):
            if not all(isinstance(name, str) for name in v):
                raise ValueError("must be a list of model names or a mapping name -> {revision, vocab_size}")
            return {name: {} for name in v}
        if isinstance(v, Mapping):
            return {name: ({} if spec is None else spec) for name, spec in v.items()}
        return v

    @model_validator(mode="after")
    def _public_audit(self) -> Settings:
        if self.audit.public and (self.api_keys or self.admin_keys):
            raise ValueError("audit.public: cannot be combined with api_keys or admin_keys (the keys decide who "
                             "reads the audit trail; unset audit.public)")
        return self

    def vocab_size_for(self, model: str) -> int:
        """The vocabulary size for ``model``'s entropy bounds: its own when configured, else the default."""
        spec = self.models.get(model)
        return spec.vocab_size if spec is not None and spec.vocab_size else self.vocab_size

    def revision_for(self, model: str) -> str | None:
        spec = self.models.get(model)
        return spec.revision if spec is not None else None


def _set_nested(target: dict[str, Any], dotted: list[str], value: Any) -> None:
    for part in dotted[:-1]:
        target = target.setdefault(part, {})
    target[dotted[-1]] = value


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """``ENTROPY_PROXY_<KEY>`` variables for known top-level keys; the prefix is shared with tools and tests
    (``ENTROPY_PROXY_VLLM_PYTHON``, ...), so other names are not settings. Nested keys are still checked."""
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX):
            path = key[len(ENV_PREFIX) :].lower().split("__")
            if path[0] in Settings.model_fields:
                _set_nested(out, path, value)
    return out


def _from_file(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise SettingsError(f"config: cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise SettingsError(f"config: {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config: {path} must hold a mapping of keys")
    return data


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Settings:
    """Build the settings from defaults, a YAML file, the environment and explicit overrides (flags).

    ``overrides`` may use dotted keys (``{"thresholds.forking": 0.5}``); ``None`` values are ignored.
    """
    environ = os.environ if environ is None else environ
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG")
    data: dict[str, Any] = _from_file(config_file) if config_file else {}
    data = _merge(data, _from_env(environ))
    flat: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_nested(flat, key.split("."), value)
    data = _merge(data, flat)
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "settings"
        msg = err["msg"]
        if err["type"] == "missing":
            msg = f"required (flag --{key}, env {ENV_PREFIX}{key.upper().replace('.', '__')}, or the config file)"
        elif err["type"] == "extra_forbidden":
            msg = "unknown key"
        raise SettingsError(f"{key}: {msg}") from None
