"""Baselines in the audit store (table ``baselines``, schema version 3): read, insert-if-absent, pin, unpin.

Race-safety between replicas rests on the primary key (model, revision, source): an automatic baseline is
inserted with ``ON CONFLICT DO NOTHING`` (SQLite and PostgreSQL alike), so the first replica to finish the warm-up
writes it and every other replica's attempt is a no-op; all of them then read back the stored one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
import sqlalchemy as sa

from proxy.audit.store import AuditStore, baselines

from .model import SOURCES, Baseline


def _row_to_baseline(row: Any) -> Baseline:
    b = Baseline.from_dict(orjson.loads(row.data))
    # The key columns are the truth (a file pinned under another name keeps the row's).
    b.model, b.revision, b.source = row.model, row.revision, row.source
    return b


def effective(rows: Iterable[Baseline]) -> dict[tuple[str, str], Baseline]:
    """Per (model, revision): the pinned baseline if there is one, else the automatic one."""
    out: dict[tuple[str, str], Baseline] = {}
    rank = {s: i for i, s in enumerate(SOURCES)}
    for b in rows:
        key = (b.model, b.revision)
        cur = out.get(key)
        if cur is None or rank.get(b.source, 99) < rank.get(cur.source, 99):
            out[key] = b
    return out


class BaselineStore:
    def __init__(self, store: AuditStore) -> None:
        self.store = store

    def _engine(self) -> Any:
        return self.store._conn()

    async def all(self, *, model: str | None = None, revision: str | None = None) -> list[Baseline]:
        q = sa.select(baselines).order_by(baselines.c.model, baselines.c.created.desc())
        if model is not None:
            q = q.where(baselines.c.model == model)
        if revision is not None:
            q = q.where(baselines.c.revision == revision)
        async with self._engine().connect() as conn:
            return [_row_to_baseline(r) for r in await conn.execute(q)]

    async def for_models(self, models: Iterable[str]) -> list[Baseline]:
        names = sorted(set(models))
        if not names:
            return []
        q = sa.select(baselines).where(baselines.c.model.in_(names))
        async with self._engine().connect() as conn:
            return [_row_to_baseline(r) for r in await conn.execute(q)]

    @staticmethod
    def _values(b: Baseline) -> dict[str, Any]:
        return {"model": b.model, "revision": b.revision, "source": b.source, "created": b.created,
                "tokens": b.tokens, "responses": b.responses, "data": orjson.dumps(b.to_dict()).decode()}

    async def insert_if_absent(self, b: Baseline) -> bool:
        """Store ``b`` unless a baseline with its (model, revision, source) exists; True when this call wrote it."""
        stmt = self.store._insert(baselines).values(**self._values(b)).on_conflict_do_nothing(
            index_elements=["model", "revision", "source"])
        async with self._engine().begin() as conn:
            result = await conn.execute(stmt)
        return bool(result.rowcount)

    async def pin(self, b: Baseline) -> None:
        """Store ``b`` as the pinned baseline of its (model, revision), replacing an earlier pin."""
        b.source = "pinned"
        values = self._values(b)
        stmt = self.store._insert(baselines).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["model", "revision", "source"],
            set_={k: stmt.excluded[k] for k in ("created", "tokens", "responses", "data")},
        )
        async with self._engine().begin() as conn:
            await conn.execute(stmt)

    async def delete(self, model: str, revision: str, source: str) -> bool:
        q = sa.delete(baselines).where(baselines.c.model == model, baselines.c.revision == revision,
                                       baselines.c.source == source)
        async with self._engine().begin() as conn:
            result = await conn.execute(q)
        return bool(result.rowcount)
