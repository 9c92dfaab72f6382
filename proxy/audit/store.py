"""The audit store: SQLAlchemy 2 Core over an async driver, SQLite by default, PostgreSQL for shared stores.

``sqlite:///path.db`` runs on aiosqlite (WAL mode, so the page can read while the writer writes);
``postgresql://user:pw@host/db`` and the socket form ``postgresql://postgres:@/postgres?host=/dir`` run on asyncpg.
A new store gets the whole schema on start; an older one is brought forward by the steps in ``MIGRATIONS`` (its
version lives in the ``schema_version`` table; on PostgreSQL an advisory lock keeps concurrently starting replicas
from racing). Version 2 added ``audit_probe_results``: the recognition probe's re-scoring of sampled responses;
version 3 the second version's baselines, canary rounds and semantic-entropy columns.

Rows hold numbers and, only when the writer was told to (``audit.store_text``), text. The store itself never sees
request headers, so no ``Authorization`` value or API key can reach it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

SCHEMA_VERSION = 3
_ADVISORY_LOCK = 0x656E7470  # "entp": serialises schema set-up across replicas on PostgreSQL

metadata = sa.MetaData()

INSERT_SLICE = 32  # response rows per INSERT statement within one batch's transaction

schema_version = sa.Table("schema_version", metadata, sa.Column("version", sa.Integer, nullable=False))

responses = sa.Table(
    "audit_responses",
    metadata,
    sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("response_id", sa.String(255), nullable=False),
    sa.Column("choice_index", sa.Integer, nullable=False, default=0),
    sa.Column("created", sa.Float, nullable=False),  # unix seconds
    sa.Column("model", sa.String(255), nullable=False),
    sa.Column("endpoint", sa.String(32), nullable=False),
    sa.Column("flags", sa.String(255), nullable=False),  # ",confident,forking_heavy," for LIKE filters
    sa.Column("mean_entropy", sa.Float),
    sa.Column("confidence", sa.Float),
    sa.Column("n_tokens", sa.Integer, nullable=False),
    sa.Column("finish_reason", sa.String(64)),
    sa.Column("streamed", sa.Boolean, nullable=False, default=False),
    sa.Column("summary", sa.Text, nullable=False),  # JSON: the `entropy` object without per_token
    sa.Column("entropies", sa.Text, nullable=False),  # JSON list, nats per generated token
    sa.Column("token_probs", sa.Text, nullable=False),  # JSON list, probability of each sampled token
    sa.Column("alt_probs", sa.Text, nullable=False),  # JSON: per token, the top alternatives' probabilities
    sa.Column("alt_tokens", sa.Text),  # JSON: per token, the alternatives' strings: only with store_text
    sa.Column("tokens", sa.Text),  # JSON list of token strings: only with store_text
    sa.Column("prompt", sa.Text),  # JSON of the prompt/messages: only with store_text
    sa.Column("completion", sa.Text),  # only with store_text
    # Version 3, set later by proxy.semantic for shadow-sampled responses (NULL for the others):
    sa.Column("semantic_entropy", sa.Float),  # nats, likelihood-weighted, over the shadow samples' meanings
    sa.Column("semantic_entropy_discrete", sa.Float),  # nats, by cluster sizes
    sa.Column("semantic_samples", sa.Integer),
    sa.Column("semantic_clusters", sa.Text),  # JSON list of clusters; their answers' text only with store_text
    sa.UniqueConstraint("response_id", "choice_index", name="uq_audit_response_choice"),
)
SEMANTIC_COLUMNS = ("semantic_entropy", "semantic_entropy_discrete", "semantic_samples", "semantic_clusters")
sa.Index("ix_audit_responses_created", responses.c.created)
sa.Index("ix_audit_responses_model_created", responses.c.model, responses.c.created)

feedback = sa.Table(
    "audit_feedback",
    metadata,
    sa.Column("response_id", sa.String(255), primary_key=True),
    sa.Column("correct", sa.Boolean, nullable=False),
    sa.Column("score", sa.Float),
    sa.Column("note", sa.Text),
    sa.Column("created", sa.Float, nullable=False),
)
sa.Index("ix_audit_feedback_correct_created", feedback.c.correct, feedback.c.created)

# The recognition probe's re-scoring of a response (proxy.probe): one row per result, so a response scored on its
# own and later paired with a reference answer has two. Numbers only: no text, whatever audit.store_text says.
probe_results = sa.Table(
    "audit_probe_results",
    metadata,
    sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("response_id", sa.String(255), nullable=False),
    sa.Column("created", sa.Float, nullable=False),  # unix seconds, when the probe finished
    sa.Column("model", sa.String(255), nullable=False),  # the probe's model label
    sa.Column("source", sa.String(255)),  # the off-policy text: "reference" or "model:<name>"; NULL: on-policy only
    sa.Column("on_tokens", sa.Integer),
    sa.Column("on_mean_entropy", sa.Float),  # nats, the model's own completion re-scored
    sa.Column("on_input_surprise", sa.Float),  # nats, mean -log p of its tokens
    sa.Column("off_tokens", sa.Integer),
    sa.Column("off_mean_entropy", sa.Float),
    sa.Column("off_input_surprise", sa.Float),
    sa.Column("ratio", sa.Float),  # H_off / H_on for this pair
    sa.Column("selfcheck_aligned", sa.Boolean),
    sa.Column("selfcheck_abs_diff", sa.Float),  # mean |re-scored - generation-time| per token, nats
    sa.Column("selfcheck_max_abs_diff", sa.Float),
    sa.Column("selfcheck_mean_diff", sa.Float),
)
sa.Index("ix_audit_probe_results_response", probe_results.c.response_id)
sa.Index("ix_audit_probe_results_model_created", probe_results.c.model, probe_results.c.created)

# Baselines per (model, revision) (proxy.baselines): one row per source ("auto": written once by the first replica
# to finish the warm-up, insert-if-absent; "pinned": by an operator, replaced on re-pin). `data` is the baseline's
# JSON (proxy.baselines.model.Baseline.to_dict): measures and histogram counts, no text.
baselines = sa.Table(
    "baselines",
    metadata,
    sa.Column("model", sa.String(255), primary_key=True),
    sa.Column("revision", sa.String(255), primary_key=True),
    sa.Column("source", sa.String(16), primary_key=True),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("tokens", sa.Integer, nullable=False),
    sa.Column("responses", sa.Integer, nullable=False),
    sa.Column("data", sa.Text, nullable=False),
)

# Canary rounds per (model, revision) (proxy.canary): `measures` the round's values, `data` the per-prompt numbers
# (monitors.canary.PromptRound), `verdict` the comparison with the revision's baseline rounds. Numbers only.
canary_rounds = sa.Table(
    "canary_rounds",
    metadata,
    sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model", sa.String(255), nullable=False),
    sa.Column("revision", sa.String(255), nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("temperature", sa.Float, nullable=False),
    sa.Column("samples", sa.Integer, nullable=False),
    sa.Column("prompts", sa.Integer, nullable=False),
    sa.Column("tokens", sa.Integer, nullable=False),
    sa.Column("complete", sa.Boolean, nullable=False),
    sa.Column("measures", sa.Text, nullable=False),
    sa.Column("data", sa.Text, nullable=False),
    sa.Column("verdict", sa.Text),
)
sa.Index("ix_canary_rounds_model_revision", canary_rounds.c.model, canary_rounds.c.revision, canary_rounds.c.created)

Step = str | Callable[[sa.Connection], None]


def _add_columns(table: sa.Table, names: Sequence[str]) -> Callable[[sa.Connection], None]:
    def step(conn: sa.Connection) -> None:
        have = {c["name"] for c in sa.inspect(conn).get_columns(table.name)}
        for name in names:
            if name not in have:
                col = table.c[name]
                conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {name} {col.type.compile(conn.dialect)}"))

    return step


def _create(*tables: sa.Table) -> Callable[[sa.Connection], None]:
    def step(conn: sa.Connection) -> None:
        for t in tables:
            t.create(conn, checkfirst=True)  # with its indexes

    return step


# version -> steps that bring a store at version-1 up to it, run in order inside the set-up transaction: SQL text,
# or a callable given the synchronous connection. A new store is created at SCHEMA_VERSION and runs none of them.
MIGRATIONS: dict[int, list[Step]] = {
    2: [_create(probe_results)],
    # Version 3 (second version): model-revision baselines, canary rounds, semantic entropy on audit records.
    # Each part appends its own step here; new tables need only _create(...), new columns an ALTER TABLE.
    3: [_create(baselines), _add_columns(responses, SEMANTIC_COLUMNS), _create(canary_rounds)],
}

JSON_COLUMNS = ("summary", "entropies", "token_probs", "alt_probs", "alt_tokens", "tokens", "prompt",
                "semantic_clusters")
LABELS = ("correct", "incorrect", "unlabelled")


class StoreError(RuntimeError):
    """The audit store cannot be opened, migrated or is newer than this code."""


def async_url(url: str) -> sa.engine.URL:
    """Map the configured URL to its async driver (``sqlite+aiosqlite``, ``postgresql+asyncpg``)."""
    u = sa.engine.make_url(url)
    backend = u.get_backend_name()
    if backend == "sqlite":
        return u.set(drivername="sqlite+aiosqlite")
    if backend in ("postgresql", "postgres"):
        return u.set(drivername="postgresql+asyncpg")
    raise StoreError(f"audit.url: unsupported database {backend!r} (use sqlite:/// or postgresql://)")


def _dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def _stored_version(conn: sa.Connection) -> int | None:
    """The store's schema version; None for a new (or never completely set up) store."""
    if not sa.inspect(conn).has_table(schema_version.name):
        return None
    v = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
    return None if v is None else int(v)


class AuditStore:
    def __init__(self, url: str, *, pool_timeout_s: float = 5.0) -> None:
        self.url = url
        self._url = async_url(url)
        self.dialect = self._url.get_backend_name()
        self.pool_timeout_s = pool_timeout_s
        self.engine: AsyncEngine | None = None

    # -- life cycle ------------------------------------------------------------------------------------------------
    def _make_engine(self) -> AsyncEngine:
        if self.dialect == "sqlite":
            db = self._url.database
            if db and db != ":memory:":
                Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
            if not db or db == ":memory:":
                return create_async_engine(self._url, poolclass=sa.pool.StaticPool)
            engine = create_async_engine(self._url, connect_args={"timeout": self.pool_timeout_s})

            @sa.event.listens_for(engine.sync_engine, "connect")
            def _pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()

            return engine
        return create_async_engine(
            self._url,
            pool_size=4,
            max_overflow=2,
            pool_timeout=self.pool_timeout_s,
            pool_pre_ping=True,
            connect_args={"timeout": self.pool_timeout_s, "command_timeout": 30},
        )

    async def start(self) -> None:
        """Open the engine and create or migrate the schema."""
        if self.engine is None:
            self.engine = self._make_engine()
        async with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK})
            current = await conn.run_sync(_stored_version)
            if current is None:
                await conn.run_sync(metadata.create_all, checkfirst=True)
                await conn.execute(schema_version.insert().values(version=SCHEMA_VERSION))
                return
            if current > SCHEMA_VERSION:
                raise StoreError(f"audit.url: the store has schema version {current}, newer than {SCHEMA_VERSION}")
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for step in MIGRATIONS.get(version, []):
                    if isinstance(step, str):
                        await conn.execute(sa.text(step))
                    else:
                        await conn.run_sync(step)
            if current != SCHEMA_VERSION:
                await conn.execute(schema_version.update().values(version=SCHEMA_VERSION))

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.dispose()
            self.engine = None

    def _conn(self) -> Any:
        if self.engine is None:
            raise StoreError("audit store not started")
        return self.engine

    # -- writes ----------------------------------------------------------------------------------------------------
    def _insert(self, table: sa.Table) -> Any:
        return (pg_dialect.insert if self.dialect == "postgresql" else sqlite_dialect.insert)(table)

    async def insert_batch(
        self, rows: Sequence[dict[str, Any]], probe_rows: Sequence[dict[str, Any]] = ()
    ) -> None:
        """Insert response rows (one whose (response_id, choice_index) is already stored is skipped) and probe
        result rows, in one transaction."""
        if not rows and not probe_rows:
            return
        async with self._conn().begin() as conn:
            if rows:
                stmt = self._insert(responses).on_conflict_do_nothing(index_elements=["response_id", "choice_index"])
                # In slices: SQLAlchemy prepares each execute's parameters on the proxy's event loop (~20 µs a row);
                # between slices the loop serves requests while the database works.
                for i in range(0, len(rows), INSERT_SLICE):
                    await conn.execute(stmt, list(rows[i : i + INSERT_SLICE]))
            if probe_rows:
                await conn.execute(probe_results.insert(), list(probe_rows))

    async def set_feedback(
        self, response_id: str, correct: bool, score: float | None = None, note: str | None = None
    ) -> dict[str, Any] | None:
        """Record (or replace) the label for ``response_id``; returns the label it replaced, if any."""
        values = {"response_id": response_id, "correct": correct, "score": score, "note": note, "created": time.time()}
        stmt = self._insert(feedback).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["response_id"],
            set_={k: stmt.excluded[k] for k in ("correct", "score", "note", "created")},
        )
        async with self._conn().begin() as conn:
            prev = (await conn.execute(sa.select(feedback).where(feedback.c.response_id == response_id))).first()
            await conn.execute(stmt)
        return dict(prev._mapping) if prev is not None else None

    async def purge(self, before: float) -> int:
        """Delete responses recorded before ``before`` (unix seconds), their labels and probe results older than
        that; returns the responses deleted."""
        old_ids = sa.select(responses.c.response_id).where(responses.c.created < before)
        async with self._conn().begin() as conn:
            await conn.execute(sa.delete(feedback).where(feedback.c.response_id.in_(old_ids)))
            await conn.execute(sa.delete(probe_results).where(probe_results.c.created < before))
            result = await conn.execute(sa.delete(responses).where(responses.c.created < before))
        return int(result.rowcount or 0)

    # -- reads -----------------------------------------------------------------------------------------------------
    def _select(self) -> sa.Select[Any]:
        return sa.select(
            responses,
            feedback.c.correct,
            feedback.c.score,
            feedback.c.note,
            feedback.c.created.label("feedback_created"),
        ).select_from(responses.outerjoin(feedback, feedback.c.response_id == responses.c.response_id))

    @staticmethod
    def _row(row: Any) -> dict[str, Any]:
        d = {str(k): v for k, v in row._mapping.items()}
        for col in JSON_COLUMNS:
            if d.get(col) is not None:
                d[col] = orjson.loads(d[col])
        d["flags"] = [f for f in d["flags"].split(",") if f]
        # Readers get one list per token of [token or None, probability] pairs.
        probs, toks = d.pop("alt_probs") or [], d.pop("alt_tokens")
        d["alternatives"] = [
            [[toks[i][j] if toks is not None else None, p] for j, p in enumerate(ps)] for i, ps in enumerate(probs)
        ]
        return d

    async def exists(self, response_id: str) -> bool:
        q = sa.select(sa.literal(1)).where(responses.c.response_id == response_id).limit(1)
        async with self._conn().connect() as conn:
            return (await conn.execute(q)).first() is not None

    async def get(self, response_id: str) -> list[dict[str, Any]]:
        """Every stored choice of one response, with its label."""
        q = self._select().where(responses.c.response_id == response_id).order_by(responses.c.choice_index)
        async with self._conn().connect() as conn:
            return [self._row(r) for r in await conn.execute(q)]

    @staticmethod
    def _filtered(q: sa.Select[Any], model: str | None, flag: str | None, label: str | None) -> sa.Select[Any]:
        if model:
            q = q.where(responses.c.model == model)
        if flag:
            q = q.where(responses.c.flags.like(f"%,{flag},%"))
        if label == "correct":
            q = q.where(feedback.c.correct.is_(True))
        elif label == "incorrect":
            q = q.where(feedback.c.correct.is_(False))
        elif label == "unlabelled":
            q = q.where(feedback.c.response_id.is_(None))
        return q

    async def recent(
        self,
        *,
        model: str | None = None,
        flag: str | None = None,
        label: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Most recent first, filtered by model, flag and label (``correct``/``incorrect``/``unlabelled``)."""
        q = self._filtered(self._select(), model, flag, label)
        q = q.order_by(responses.c.created.desc(), responses.c.pk.desc()).limit(limit).offset(offset)
        async with self._conn().connect() as conn:
            return [self._row(r) for r in await conn.execute(q)]

    async def confident_wrong(self, *, model: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Responses flagged ``confident`` and labelled incorrect, most confident first."""
        q = self._filtered(self._select(), model, "confident", "incorrect")
        q = q.order_by(responses.c.confidence.desc(), responses.c.created.desc()).limit(limit)
        async with self._conn().connect() as conn:
            return [self._row(r) for r in await conn.execute(q)]

    async def labelled(self, *, model: str | None = None, limit: int | None = None) -> list[tuple[float, bool]]:
        """(confidence, correct) of labelled responses, the most recently labelled ``limit`` of them."""
        q = (
            sa.select(responses.c.confidence, feedback.c.correct)
            .select_from(responses.join(feedback, feedback.c.response_id == responses.c.response_id))
            .where(responses.c.confidence.is_not(None))
            .order_by(feedback.c.created.desc())
        )
        if model:
            q = q.where(responses.c.model == model)
        if limit is not None:
            q = q.limit(limit)
        async with self._conn().connect() as conn:
            return [(float(c), bool(ok)) for c, ok in await conn.execute(q)]

    async def labelled_scores(self, *, model: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """(confidence, mean_entropy, semantic_entropy, correct) of labelled responses, most recently labelled
        first, for ranking the scores by AUROC (semantic_entropy is None where the response was not sampled)."""
        r = responses.c
        q = (
            sa.select(r.confidence, r.mean_entropy, r.semantic_entropy, feedback.c.correct)
            .select_from(responses.join(feedback, feedback.c.response_id == r.response_id))
            .order_by(feedback.c.created.desc())
        )
        if model:
            q = q.where(r.model == model)
        if limit is not None:
            q = q.limit(limit)
        async with self._conn().connect() as conn:
            return [dict(row._mapping) for row in await conn.execute(q)]

    async def set_semantic(self, response_id: str, choice_index: int, values: dict[str, Any],
                           flag: str | None = None) -> int:
        """Write a stored response's semantic-entropy columns (``SEMANTIC_COLUMNS``; the clusters as JSON) and
        add ``flag`` to its flags; returns the rows updated (0 when the response is not stored)."""
        vals = {k: (_dumps(v) if k == "semantic_clusters" else v) for k, v in values.items() if k in SEMANTIC_COLUMNS}
        where = (responses.c.response_id == response_id) & (responses.c.choice_index == choice_index)
        async with self._conn().begin() as conn:
            n = (await conn.execute(sa.update(responses).where(where).values(**vals))).rowcount
            if flag:
                await conn.execute(sa.update(responses).where(where & ~responses.c.flags.like(f"%,{flag},%"))
                                   .values(flags=responses.c.flags + f"{flag},"))
        return int(n or 0)

    async def models(self) -> list[str]:
        q = sa.select(responses.c.model).distinct().order_by(responses.c.model)
        async with self._conn().connect() as conn:
            return [m for (m,) in await conn.execute(q)]

    async def count(self) -> int:
        async with self._conn().connect() as conn:
            return int((await conn.execute(sa.select(sa.func.count()).select_from(responses))).scalar_one())

    # -- probe results -----------------------------------------------------------------------------------------------
    async def probe_results_for(self, response_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """The probe results of these responses, newest first per response."""
        ids = list(dict.fromkeys(response_ids))
        out: dict[str, list[dict[str, Any]]] = {}
        if not ids:
            return out
        q = (
            sa.select(probe_results)
            .where(probe_results.c.response_id.in_(ids))
            .order_by(probe_results.c.created.desc(), probe_results.c.pk.desc())
        )
        async with self._conn().connect() as conn:
            for r in await conn.execute(q):
                out.setdefault(r.response_id, []).append(dict(r._mapping))
        return out

    async def recent_probe_results(self, *, model: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        q = sa.select(probe_results).order_by(probe_results.c.created.desc(), probe_results.c.pk.desc()).limit(limit)
        if model:
            q = q.where(probe_results.c.model == model)
        async with self._conn().connect() as conn:
            return [dict(r._mapping) for r in await conn.execute(q)]

    async def probe_summary(self, *, model: str | None = None) -> list[dict[str, Any]]:
        """Per model over the stored results: how many, how many pairs, the ratio of means sum(H_off)/sum(H_on)
        over the pairs (as the probe computes it over its window), and the mean self-check difference."""
        p = probe_results.c
        paired = p.ratio.is_not(None)
        q = (
            sa.select(
                p.model,
                sa.func.count().label("results"),
                sa.func.count(p.ratio).label("pairs"),
                sa.func.sum(sa.case((paired, p.on_mean_entropy))).label("on_sum"),
                sa.func.sum(sa.case((paired, p.off_mean_entropy))).label("off_sum"),
                sa.func.avg(p.selfcheck_abs_diff).label("selfcheck_abs_diff"),
                sa.func.count(p.selfcheck_abs_diff).label("aligned"),
                sa.func.max(p.created).label("last"),
            )
            .group_by(p.model)
            .order_by(p.model)
        )
        if model:
            q = q.where(p.model == model)
        async with self._conn().connect() as conn:
            rows = [dict(r._mapping) for r in await conn.execute(q)]
        for r in rows:
            on, off = r.pop("on_sum"), r.pop("off_sum")
            r["ratio"] = float(off) / float(on) if on and off is not None and on > 0 else None
            if r["selfcheck_abs_diff"] is not None:
                r["selfcheck_abs_diff"] = float(r["selfcheck_abs_diff"])
        return rows

    async def iter_all(self, batch: int = 500) -> AsyncIterator[dict[str, Any]]:
        """Every stored response with its label, oldest first (for export)."""
        last = 0
        while True:
            q = self._select().where(responses.c.pk > last).order_by(responses.c.pk).limit(batch)
            async with self._conn().connect() as conn:
                rows = [self._row(r) for r in await conn.execute(q)]
            if not rows:
                return
            for r in rows:
                yield r
            last = rows[-1]["pk"]

    async def dump_tables(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table in the database, raw, found by reflection (for tests that scan for leaks)."""
        out: dict[str, list[tuple[Any, ...]]] = {}
        async with self._conn().connect() as conn:
            reflected = sa.MetaData()
            await conn.run_sync(reflected.reflect)
            for table in reflected.sorted_tables:
                out[table.name] = [tuple(r) for r in await conn.execute(sa.select(table))]
        return out
