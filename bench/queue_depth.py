#!/usr/bin/env python3
"""Submit, claim and finish cost against queue depth, batch submit, and the claim's query plan.

A real ``python dispatch.py``; one person's queue is filled with batch submits of 1,000 (each
timed), a few other people queue a few jobs each (the claim walks the people with work, so they
count), and one worker (offering plenty) then measures, at each depth:

  submit  p50/p99 of a single ``POST /api/jobs/submit`` (the answer's estimate included), by the
          person with the long queue: the worst case for the "jobs ahead" count
  claim   p50/p99 of ``GET /api/jobs/get-job``
  finish  p50/p99 of the ``POST /api/jobs/submit-result`` that completes each claimed job
  sql     p50 of the claim statement alone, through sqlite3 on the server's database (in a
          transaction that is rolled back)

Ends with ``EXPLAIN QUERY PLAN`` of the claim and of the submit's estimate.

    python bench/queue_depth.py [--depths 100,100000] [--samples 200] [--people 3]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import sqlite3
import sys
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (ROOT, REGISTRATION_TOKEN, DispatchServer, Workspace, api_call, login,  # noqa: E402
                     percentile, print_banner)

sys.path.insert(0, str(ROOT))
import dispatch  # noqa: E402

BATCH = 1000


class Client:
    """One kept-alive HTTP connection, so a sample times the server, not a TCP handshake."""

    def __init__(self, url: str, headers: dict):
        self._conn = http.client.HTTPConnection(urllib.parse.urlsplit(url).netloc, timeout=60)
        self._headers = headers

    def call(self, method: str, path: str, body=None) -> tuple[int, dict | None, float]:
        """(status, answer, seconds)."""
        data = json.dumps(body).encode() if body is not None else None
        started = time.perf_counter()
        self._conn.request(method, path, body=data, headers={**self._headers, "Content-Type": "application/json"})
        response = self._conn.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else None, time.perf_counter() - started


class Captured(dispatch.Store):
    """A Store that keeps the statement it would run, so the plan is of the very SQL dispatch runs."""

    async def _one(self, sql, params=()):
        self.statement = (sql, params)


def statement(call) -> tuple[str, dict]:
    store = Captured(dispatch._SQLite, dispatch.Clock())  # the engine's class: its SQL fragments, no connection
    asyncio.run(call(store))
    return store.statement


def fill(owner: Client, depth: int, queued: int, batch_seconds: list) -> None:
    while queued < depth:
        size = min(BATCH, depth - queued)
        status, body, seconds = owner.call("POST", "/api/jobs/submit", {"jobs": [{"command": "true"}] * size})
        assert status == 201, body
        if size == BATCH:
            batch_seconds.append(seconds)
        queued += size


def measure(owner: Client, worker: Client, samples: int) -> dict[str, list[float]]:
    submits, claims, finishes = [], [], []
    for _ in range(samples):
        status, body, seconds = owner.call("POST", "/api/jobs/submit", {"command": "true"})
        assert status == 201, body
        submits.append(seconds)
        status, body, seconds = worker.call("GET", "/api/jobs/get-job")
        assert status == 200, body
        claims.append(seconds)
        status, body, seconds = worker.call("POST", "/api/jobs/submit-result",
                                            {"jobId": body["job"]["jobId"], "exitCode": 0})
        assert status == 200, body
        finishes.append(seconds)
    return {"submit": submits, "claim": claims, "finish": finishes}


def sql_claim(db: Path, worker_id: str, samples: int) -> list[float]:
    sql, params = statement(lambda store: store.claim_next_job(worker_id, "[]", None, None))
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    times = []
    for _ in range(samples):
        conn.execute("BEGIN IMMEDIATE")
        started = time.perf_counter()
        assert conn.execute(sql, params).fetchall()
        times.append(time.perf_counter() - started)
        conn.execute("ROLLBACK")
    conn.close()
    return times


def plan(db: Path, sql: str, params) -> str:
    conn = sqlite3.connect(db)
    rows = conn.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
    conn.close()
    depth = {0: 0}
    lines = []
    for node, parent, _, detail in rows:
        depth[node] = depth.get(parent, 0) + 1
        lines.append("  " * depth[node] + detail)
    return "\n".join(lines)


def ms(values: list[float], p: float) -> float:
    return percentile(values, p) * 1000


def report(batches: list[float], results: dict[int, dict[str, list[float]]]) -> None:
    print(f"\nbatch submit of {BATCH} jobs in one request: p50 {ms(batches, 50):.0f} ms, "
          f"max {max(batches, default=float('nan')) * 1000:.0f} ms ({len(batches)} batches)")
    timed = ("submit", "claim", "finish")
    print(f"\n{'queued':>8} | " + " | ".join(f"{key + ' p50':>10} {'p99':>7}" for key in timed)
          + f" | {'claim SQL p50':>13}")
    for depth, r in results.items():
        print(f"{depth:>8} | " + " | ".join(f"{ms(r[key], 50):>8.2f}ms {ms(r[key], 99):>5.2f}ms" for key in timed)
              + f" | {ms(r['sql'], 50):>11.3f}ms")
    (low, *_, high) = results.items()
    for key in (*timed, "sql"):
        print(f"{key} p50 at {high[0]} queued / at {low[0]}: {ms(high[1][key], 50) / ms(low[1][key], 50):.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", default="100,100000", help="queued jobs to measure at, ascending")
    parser.add_argument("--samples", type=int, default=200, help="submits and claims timed at each depth")
    parser.add_argument("--people", type=int, default=3, help="other people with a few jobs queued")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    print_banner("queue depth: submit, claim and finish cost with N jobs queued")
    with Workspace(args.keep) as work:
        server = DispatchServer(work).start()
        try:
            admin = login(server.url)
            owner = Client(server.url, {"Authorization": f"Bearer {admin}"})
            for n in range(args.people):
                email = f"person{n}@example.com"
                api_call(server.url, "POST", "/api/users", {"email": email, "password": "password-1"}, token=admin)
                _, body = api_call(server.url, "POST", "/api/auth/login", {"email": email, "password": "password-1"})
                person = Client(server.url, {"Authorization": f"Bearer {body['token']}"})
                person.call("POST", "/api/jobs/submit", {"jobs": [{"command": "true", "cpus": 2}] * 5})
            status, body = api_call(server.url, "POST", "/api/workers/register",
                                    {"workerId": "bench-worker", "hostname": "bench", "cpus": 1},
                                    token=REGISTRATION_TOKEN)
            assert status == 201, body
            worker_token = body["token"]
            db = server.data_dir / "dispatch.db"
            queued, batches, results = 0, [], {}
            for depth in depths:
                fill(owner, depth, queued, batches)
                queued = depth
                worker = Client(server.url, {"x-worker-token": worker_token})  # a fresh one: idle while filling
                results[depth] = {**measure(owner, worker, args.samples),
                                  "sql": sql_claim(db, "bench-worker", args.samples)}
            report(batches, results)
            sql, params = statement(lambda store: store.claim_next_job("bench-worker", "[]", None, None))
            print("\nEXPLAIN QUERY PLAN, the claim (Store.claim_next_job):\n" + plan(db, sql, params))
            job = dict(server.db().execute("SELECT * FROM jobs WHERE status = 'queued' ORDER BY seq DESC LIMIT 1")
                       .fetchone())
            sql, params = statement(lambda store: store.queue_estimate(job, dispatch.AHEAD_COUNT_LIMIT))
            print("\nEXPLAIN QUERY PLAN, the submit's estimate (Store.queue_estimate):\n" + plan(db, sql, params))
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
