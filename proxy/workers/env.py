"""What a worker process knows about itself, passed down by the supervisor in the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

INDEX = "ENTROPY_PROXY_WORKER_INDEX"
COUNT = "ENTROPY_PROXY_WORKER_COUNT"
RUN_DIR = "ENTROPY_PROXY_WORKER_DIR"
SECRET = "ENTROPY_PROXY_WORKER_SECRET"


@dataclass(frozen=True, slots=True)
class WorkerEnv:
    index: int  # 0 in a single-process proxy
    count: int  # 1 in a single-process proxy
    run_dir: Path | None  # where the workers' private sockets live (None: single process)
    secret: str  # sent by a worker gathering its siblings' metrics; a client cannot ask for one worker's view

    @property
    def is_leader(self) -> bool:
        return self.index == 0

    @property
    def supervised(self) -> bool:
        return self.run_dir is not None and self.count > 1

    def socket_path(self, index: int) -> Path:
        assert self.run_dir is not None
        return self.run_dir / f"worker-{index}.sock"


def worker_env(environ: dict[str, str] | None = None) -> WorkerEnv:
    env = os.environ if environ is None else environ
    try:
        index, count = int(env.get(INDEX, "0")), int(env.get(COUNT, "1"))
    except ValueError:
        index, count = 0, 1
    run_dir = env.get(RUN_DIR)
    return WorkerEnv(index, count, Path(run_dir) if run_dir else None, env.get(SECRET, ""))
