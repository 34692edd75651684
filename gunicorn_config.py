"""Gunicorn settings for `gunicorn main:app -c gunicorn_config.py`, each from the environment.

Each worker is its own process with its own model and batcher: size WORKERS to the cores
(one worker can already use all of them through torch's threads) or to the GPUs (one per device).
`threads` is left alone: an async worker serves every connection on its event loop.
The request deadline is TIMEOUT (the seed's `timeout`); gunicorn's own worker timeout is WORKER_TIMEOUT.
"""

import os
import shutil
import tempfile

bind = os.environ.get("BIND", "0.0.0.0:5001")
workers = int(os.environ.get("WORKERS", "1"))
worker_class = "uvicorn_worker.UvicornWorker"
timeout = int(os.environ.get("WORKER_TIMEOUT", "60"))  # silent worker -> killed and replaced
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "30"))  # SIGTERM -> finish work within this
keepalive = int(os.environ.get("KEEPALIVE", "5"))
accesslog = os.environ.get("ACCESS_LOG", "-") or None  # "-" is stdout; empty turns it off
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")

# Prometheus multiprocess mode: every worker writes its samples here and /metrics sums them.
# The variable must be set before any worker imports prometheus_client, hence here, in the master.
_own_metrics_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
if _own_metrics_dir:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="prometheus-")


def on_starting(server: object) -> None:
    """Start from an empty metrics directory: stale files would be summed into the new run."""
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    for name in os.listdir(path):
        os.remove(os.path.join(path, name))


def child_exit(server: object, worker: object) -> None:
    """Drop a dead worker's live gauges (queue depth) from the sums."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined,no-untyped-call]


def on_exit(server: object) -> None:
    if _own_metrics_dir:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
