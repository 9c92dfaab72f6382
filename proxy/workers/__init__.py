"""``entropy-proxy serve --workers N``: N processes answering on one port, one ``/metrics`` for all of them.

- :mod:`.supervisor` binds the port once and starts N worker processes that share the listening socket (as
  gunicorn and uvicorn do); a worker that dies is started again under the same index; SIGTERM/SIGINT is passed
  to every worker, each drains its in-flight requests and runs its shutdown (audit queue flushed), and the
  supervisor exits 0 once all have.
- Worker 0 is the *leader* (``app.state.is_leader``): background samplers and the baseline writer run there
  only. Single-process ``serve`` is its own leader.
- :mod:`.aggregate`: each worker also listens on a private Unix socket; ``GET /metrics`` on the shared port
  gathers every worker's exposition over those sockets and merges it: counters and histograms summed per label
  set, gauges (the live monitors' readings, states, baselines) taken from the leader. See docs/configuration.md,
  "Workers".
"""

from .env import WorkerEnv, worker_env

__all__ = ["WorkerEnv", "worker_env"]
