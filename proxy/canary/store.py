"""Where canary rounds are kept: the audit store's ``canary_rounds`` table, or memory when the audit trail is off.

Both backends answer the same three questions: add a round, the first ``n`` complete rounds of a (model, revision)
at a given temperature and sample count (the baseline), and the latest rounds of a model.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import sqlalchemy as sa

from monitors.canary import PromptRound
from proxy.audit.store import AuditStore, canary_rounds

MEMORY_ROUNDS = 1_000  # per (model, revision), oldest dropped (the baseline rounds are kept)


@dataclass(slots=True)
class RoundRecord:
    model: str
    revision: str
    temperature: float
    samples: int
    prompts: list[PromptRound]
    tokens: int
    complete: bool
    measures: dict[str, float | None]
    created: float = field(default_factory=time.time)
    verdict: dict[str, Any] | None = None
    pk: int | None = None

    def summary(self) -> dict[str, Any]:
        return {"pk": self.pk, "created": round(self.created, 3), "revision": self.revision,
                "temperature": self.temperature, "samples": self.samples, "prompts": len(self.prompts),
                "tokens": self.tokens, "complete": self.complete,
                "measures": {k: (None if v is None else round(v, 5)) for k, v in self.measures.items()}}


class RoundStore(Protocol):
    async def add(self, r: RoundRecord) -> None: ...

    async def baseline(self, model: str, revision: str, temperature: float, samples: int,
                       n: int) -> list[RoundRecord]: ...

    async def latest(self, model: str, limit: int = 20) -> list[RoundRecord]: ...

    async def count(self, model: str, revision: str) -> int: ...

    async def revisions(self, model: str) -> list[str]: ...


async def previous_baseline(
    store: RoundStore, model: str, revision: str, temperature: float, samples: int, n: int
) -> tuple[str, list[RoundRecord]] | None:
    """The baseline of the model's most recently sampled *other* revision that has one (``n`` complete rounds at
    this temperature and sample count): what a new revision is compared with until it has its own."""
    for other in await store.revisions(model):
        if other != revision:
            rounds = await store.baseline(model, other, temperature, samples, n)
            if len(rounds) >= n:
                return other, rounds
    return None


class MemoryRounds:
    def __init__(self) -> None:
        self._rounds: dict[tuple[str, str], list[RoundRecord]] = defaultdict(list)
        self._next = 1

    async def add(self, r: RoundRecord) -> None:
        r.pk, self._next = self._next, self._next + 1
        rows = self._rounds[(r.model, r.revision)]
        rows.append(r)
        if len(rows) > MEMORY_ROUNDS:
            del rows[len(rows) // 2]  # keeps the first rounds (the baseline) and the recent ones

    async def baseline(self, model: str, revision: str, temperature: float, samples: int,
                       n: int) -> list[RoundRecord]:
        rows = [r for r in self._rounds.get((model, revision), ())
                if r.complete and r.temperature == temperature and r.samples == samples]
        return rows[:n]

    async def latest(self, model: str, limit: int = 20) -> list[RoundRecord]:
        rows = [r for (m, _), rs in self._rounds.items() if m == model for r in rs]
        return sorted(rows, key=lambda r: r.created)[-limit:][::-1]

    async def count(self, model: str, revision: str) -> int:
        return len(self._rounds.get((model, revision), ()))

    async def revisions(self, model: str) -> list[str]:
        """The model's revisions, most recently sampled first."""
        last = {rev: rs[-1].created for (m, rev), rs in self._rounds.items() if m == model and rs}
        return sorted(last, key=lambda r: last[r], reverse=True)


def _record(row: Any) -> RoundRecord:
    return RoundRecord(
        model=row.model, revision=row.revision, temperature=row.temperature, samples=row.samples,
        prompts=[PromptRound.from_dict(d) for d in orjson.loads(row.data)], tokens=row.tokens,
        complete=bool(row.complete), measures=orjson.loads(row.measures), created=row.created,
        verdict=orjson.loads(row.verdict) if row.verdict else None, pk=row.pk,
    )


class DatabaseRounds:
    """Rounds in the audit store (SQLite or PostgreSQL); the store must have been started."""

    def __init__(self, store: AuditStore) -> None:
        self.store = store

    def _engine(self) -> Any:
        return self.store._conn()

    async def add(self, r: RoundRecord) -> None:
        values = {
            "model": r.model, "revision": r.revision, "created": r.created, "temperature": r.temperature,
            "samples": r.samples, "prompts": len(r.prompts), "tokens": r.tokens, "complete": r.complete,
            "measures": orjson.dumps(r.measures).decode(),
            "data": orjson.dumps([p.to_dict() for p in r.prompts]).decode(),
            "verdict": orjson.dumps(r.verdict).decode() if r.verdict is not None else None,
        }
        async with self._engine().begin() as conn:
            result = await conn.execute(sa.insert(canary_rounds).values(**values))
            pk = result.inserted_primary_key
            r.pk = int(pk[0]) if pk else None

    async def baseline(self, model: str, revision: str, temperature: float, samples: int,
                       n: int) -> list[RoundRecord]:
        c = canary_rounds.c
        q = (sa.select(canary_rounds)
             .where(c.model == model, c.revision == revision, c.complete.is_(True), c.samples == samples,
                    sa.func.abs(c.temperature - temperature) < 1e-9)
             .order_by(c.created, c.pk).limit(n))
        async with self._engine().connect() as conn:
            return [_record(row) for row in await conn.execute(q)]

    async def latest(self, model: str, limit: int = 20) -> list[RoundRecord]:
        c = canary_rounds.c
        q = sa.select(canary_rounds).where(c.model == model).order_by(c.created.desc(), c.pk.desc()).limit(limit)
        async with self._engine().connect() as conn:
            return [_record(row) for row in await conn.execute(q)]

    async def count(self, model: str, revision: str) -> int:
        c = canary_rounds.c
        q = sa.select(sa.func.count()).select_from(canary_rounds).where(c.model == model, c.revision == revision)
        async with self._engine().connect() as conn:
            return int((await conn.execute(q)).scalar() or 0)

    async def revisions(self, model: str) -> list[str]:
        """The model's revisions, most recently sampled first."""
        c = canary_rounds.c
        q = (sa.select(c.revision, sa.func.max(c.created).label("last")).where(c.model == model)
             .group_by(c.revision).order_by(sa.text("last DESC")))
        async with self._engine().connect() as conn:
            return [r[0] for r in await conn.execute(q)]

    async def models(self) -> list[str]:
        async with self._engine().connect() as conn:
            return [r[0] for r in await conn.execute(sa.select(canary_rounds.c.model).distinct())]
