"""The peers' side of ``throughput.py --peers``: the same work as a dispatch job, as a Celery task
and as an RQ job. Imported by the Celery worker (``-A peer_tasks``), by the RQ workers (by the
dotted name ``peer_tasks.run_true``) and by the bench itself. Needs requirements-bench.txt.

The broker is ``BENCH_REDIS_URL`` (the bench starts a private redis-server by default).
"""

from __future__ import annotations

import os
import subprocess

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


# --- RQ: plain functions, found by dotted name ---------------------------------------------


def run_true() -> None:
    """The throughput job: the same `true` a dispatch job runs."""
    subprocess.run(["true"], check=True)


def run_shell(command: str) -> None:
    """The latency probe: the same shell command a dispatch probe job runs."""
    subprocess.run(command, shell=True, check=True)


# --- Celery -----------------------------------------------------------------------------------


def make_celery(url: str = REDIS_URL):
    """A Celery app on Redis as the issue asks: acks_late, prefetch 1, Redis result backend."""
    from celery import Celery

    app = Celery("peer_tasks", broker=url, backend=url)
    app.conf.update(
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        result_expires=3600,
    )

    @app.task(name="bench.true")
    def celery_true() -> None:
        run_true()

    @app.task(name="bench.shell")
    def celery_shell(command: str) -> None:
        run_shell(command)

    return app


try:  # the worker's `-A peer_tasks` finds this
    app = make_celery()
except ImportError:  # celery not installed: RQ only
    app = None
