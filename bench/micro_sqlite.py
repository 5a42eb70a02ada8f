#!/usr/bin/env python3
"""What one database call costs the server, split into SQLite's own work and aiosqlite's thread
hops: the statements of dispatch's hot path (worker auth, claim, finish, insert), each run

  sync      with the stdlib sqlite3 module on the calling thread
  1 hop     with aiosqlite's ``execute_fetchall`` (one trip to its thread and back)
  dispatch  the way dispatch.py's Store does it: ``async with conn.execute() as cur`` +
            ``await cur.fetchone()`` (execute, fetch and close: three trips)

on dispatch's schema (schema.sql) in WAL mode, synchronous NORMAL and FULL. Prints µs of CPU
(process time: both threads) per call.

    python bench/micro_sqlite.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, print_banner  # noqa: E402

AUTH = "SELECT id, tags FROM workers WHERE token_hash = ?"
INSERT = ("INSERT INTO jobs (id, seq, command, timeout, priority, priority_rank, tags, status, submitted_by,"
          " created_at) VALUES (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs), 'true', 600, 'normal', 1, '[]',"
          " 'queued', 'user-1', '2026-01-01T00:00:00.000Z') RETURNING *")
CLAIM = """UPDATE jobs SET status = 'running', worker_id = ?, attempt = attempt + 1,
             started_at = '2026-01-01T00:00:01.000Z', stdout_bytes = 0, stderr_bytes = 0
           WHERE id = (SELECT j.id FROM jobs j WHERE j.status = 'queued'
                         AND NOT EXISTS (SELECT 1 FROM json_each(j.tags) t
                                         WHERE t.value NOT IN (SELECT value FROM json_each('[]')))
                       ORDER BY j.priority_rank DESC, j.seq LIMIT 1)
           RETURNING *"""
FINISH = ("UPDATE jobs SET status = 'completed', exit_code = 0, completed_at = '2026-01-01T00:00:02.000Z'"
          " WHERE id = ? AND status = 'running' AND worker_id = ? AND attempt = 1 RETURNING *")
GET = "SELECT * FROM jobs WHERE id = ?"


def make_db(path: Path, synchronous: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript((ROOT / "schema.sql").read_text())
    conn.execute("INSERT INTO workers (id, token_hash, hostname, registered_at, last_heartbeat)"
                 " VALUES ('w1', 'hash-1', 'h', 'x', 'x')")
    conn.close()


def run_sync(path: Path, synchronous: str, calls: int) -> dict[str, float]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    out = {}
    ids = []
    t = time.process_time()
    for _ in range(calls):
        ids.append(conn.execute(INSERT, (uuid.uuid4().hex,)).fetchone()[0])
    out["insert job"] = time.process_time() - t
    t = time.process_time()
    for _ in range(calls):
        conn.execute(AUTH, ("hash-1",)).fetchone()
    out["worker auth (SELECT)"] = time.process_time() - t
    t = time.process_time()
    for _ in range(calls):
        conn.execute(CLAIM, ("w1",)).fetchone()
    out["claim (UPDATE..RETURNING)"] = time.process_time() - t
    t = time.process_time()
    for job_id in ids:
        conn.execute(GET, (job_id,)).fetchone()
    out["get job (SELECT *)"] = time.process_time() - t
    t = time.process_time()
    for job_id in ids:
        conn.execute(FINISH, (job_id, "w1")).fetchone()
    out["finish (UPDATE..RETURNING)"] = time.process_time() - t
    conn.close()
    return {k: v / calls * 1e6 for k, v in out.items()}


async def run_async(path: Path, synchronous: str, calls: int, hops: str) -> dict[str, float]:
    import aiosqlite

    conn = await aiosqlite.connect(path, isolation_level=None)
    conn.row_factory = aiosqlite.Row
    await conn.execute(f"PRAGMA synchronous = {synchronous}")

    async def one(sql, params):
        if hops == "1":
            rows = await conn.execute_fetchall(sql, params)
            return rows[0] if rows else None
        async with conn.execute(sql, params) as cur:
            return await cur.fetchone()

    out = {}
    ids = []
    t = time.process_time()
    for _ in range(calls):
        ids.append((await one(INSERT, (uuid.uuid4().hex,)))[0])
    out["insert job"] = time.process_time() - t
    t = time.process_time()
    for _ in range(calls):
        await one(AUTH, ("hash-1",))
    out["worker auth (SELECT)"] = time.process_time() - t
    t = time.process_time()
    for _ in range(calls):
        await one(CLAIM, ("w1",))
    out["claim (UPDATE..RETURNING)"] = time.process_time() - t
    t = time.process_time()
    for job_id in ids:
        await one(GET, (job_id,))
    out["get job (SELECT *)"] = time.process_time() - t
    t = time.process_time()
    for job_id in ids:
        await one(FINISH, (job_id, "w1"))
    out["finish (UPDATE..RETURNING)"] = time.process_time() - t
    await conn.close()
    return {k: v / calls * 1e6 for k, v in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args(argv)
    print_banner("dispatch micro: one database call")
    for synchronous in ("NORMAL", "FULL"):
        results = {}
        for mode in ("sync", "1 hop", "dispatch"):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "db.sqlite"
                make_db(path, synchronous)
                if mode == "sync":
                    results[mode] = run_sync(path, synchronous, args.calls)
                else:
                    results[mode] = asyncio.run(run_async(path, synchronous, args.calls,
                                                          "1" if mode == "1 hop" else "3"))
        print(f"\nsynchronous={synchronous}: CPU µs per call ({args.calls} calls each)")
        print("| statement | sqlite3 on the loop | aiosqlite, 1 hop | aiosqlite, 3 hops (execute, fetch, close) |")
        print("|---|---|---|---|")
        for stmt in results["sync"]:
            print(f"| {stmt} | {results['sync'][stmt]:.0f} | {results['1 hop'][stmt]:.0f} |"
                  f" {results['dispatch'][stmt]:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
