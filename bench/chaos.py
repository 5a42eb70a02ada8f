#!/usr/bin/env python3
"""kill -9 the dispatch server at random moments while a client submits jobs and agents run them.

    python bench/chaos.py --cycles 20 --jobs 500
    python bench/chaos.py --servers 2 --cycles 20 --jobs 500    # two servers on one PostgreSQL database

A real ``dispatch.py`` (fixed loopback port, one data dir) and real ``agent.py`` processes. A
client thread submits N jobs, retrying while the server is down; the main thread kills the
server with SIGKILL after a random uptime and restarts it on the same data dir and port, K
times. With ``--servers N`` (N > 1), N servers share a fresh PostgreSQL database (made on
``--postgres``, dropped at the end); the agents are given every server's URL, the client submits
through each in turn (moving to the next when one is down), and each kill takes a random one. Each job appends its own id to a shared file when it runs, so a job that ran twice is
seen even if the server recorded it once. At the end (all acknowledged jobs finished, agents
stopped) it prints:

    acknowledged  submits answered 201
    lost          acknowledged jobs the server does not have, or that never finished
    duplicated    acknowledged jobs whose command ran more than once
    orphaned      processes of jobs still alive after the agents stopped

and exits 1 if any of lost / duplicated / orphaned is not 0. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import os
import random
import shlex
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (Agents, DispatchServer, PostgresDatabase, Workspace, free_port, login, print_banner,  # noqa: E402
                     wait_for_workers)

FINISHED = ("completed", "failed", "cancelled")


class Submitter(threading.Thread):
    """Submits N jobs one after another, each until it is acknowledged (201).

    A connection refused means nothing reached the server: retried. Any other failure after the
    request may have been sent (reset, timeout, 5xx) is *ambiguous*: the job may exist without an
    acknowledgement; it is retried too, and counted, so an unacknowledged extra job is no surprise.
    """

    def __init__(self, ports: list[int], token: str, jobs: int, command: str, interval: float, deadline: float):
        super().__init__(daemon=True)
        self.ports, self.token, self.jobs, self.command = ports, token, jobs, command
        self.interval, self.deadline = interval, deadline
        self.acknowledged: list[str] = []
        self.ambiguous = 0
        self.refused = 0
        self.errors: list[str] = []

    def submit_once(self, port: int) -> str | None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            body = json.dumps({"command": self.command, "timeout": 60})
            conn.request("POST", "/api/jobs/submit", body=body,
                         headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            if resp.status == 201:
                return json.loads(data)["jobId"]
            self.ambiguous += 1
            self.errors.append(f"HTTP {resp.status}: {data[:200]!r}")
            return None
        except ConnectionRefusedError:
            self.refused += 1
            return None
        except (OSError, http.client.HTTPException) as err:
            self.ambiguous += 1
            self.errors.append(repr(err))
            return None
        finally:
            conn.close()

    def run(self) -> None:
        for n in range(self.jobs):
            tries = 0
            while time.monotonic() < self.deadline:
                job_id = self.submit_once(self.ports[(n + tries) % len(self.ports)])  # each server in turn
                tries += 1
                if job_id:
                    self.acknowledged.append(job_id)
                    break
                time.sleep(0.05)
            time.sleep(self.interval)


def marked_processes(mark: str) -> list[int]:
    """Pids of live processes whose environment carries this run's mark (the agents' children)."""
    needle = f"BENCH_CHAOS_MARK={mark}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                continue
    return found


def job_rows(server: DispatchServer, database: PostgresDatabase | None) -> list[dict]:
    sql = "SELECT id, status, attempt, error FROM jobs"
    if database:
        return database.rows(sql)
    with server.db() as db:
        return [dict(row) for row in db.execute(sql)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cycles", type=int, default=10, help="kill -9 and restart this many times (default 10)")
    p.add_argument("--jobs", type=int, default=200, help="jobs to submit (default 200)")
    p.add_argument("--agents", type=int, default=2, help="agent processes (default 2)")
    p.add_argument("--job-seconds", type=float, default=0.05, help="how long each job sleeps after recording itself")
    p.add_argument("--min-up", type=float, default=0.3, help="shortest uptime before a kill (s)")
    p.add_argument("--max-up", type=float, default=1.5, help="longest uptime before a kill (s)")
    p.add_argument("--settle", type=float, default=30.0,
                   help="at the end, give up once no job has finished for this many seconds (default 30)")
    p.add_argument("--seed", type=int, help="random seed (printed, so a run can be repeated)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, database)")
    p.add_argument("--servers", type=int, default=1, help="servers; more than 1 share a PostgreSQL database")
    p.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres",
                   help="PostgreSQL to make the shared database on (--servers > 1)")
    args = p.parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("chaos.py reads /proc: Linux only")
        return 2
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    print_banner("dispatch chaos")
    print(f"seed {seed}; {args.cycles} kill -9 cycles, {args.jobs} jobs, {args.agents} agents, {args.servers} "
          f"server(s), uptime {args.min_up:g}-{args.max_up:g} s", flush=True)
    started = time.monotonic()
    with Workspace(args.keep, prefix="dispatch-chaos-") as ws, \
            (PostgresDatabase(args.postgres) if args.servers > 1 else contextlib.nullcontext()) as database:
        ran_file = ws / "ran.txt"
        ran_file.touch()
        mark = uuid.uuid4().hex
        env = {"DISPATCH_DATABASE_URL": database.url} if database else {}
        servers = [DispatchServer(ws / f"server-{n}", port=free_port(), env=env).start() for n in range(args.servers)]
        server = servers[0]
        agents = None
        try:
            token = login(server.url)
            agents = Agents(ws / "agents", ",".join(s.url for s in servers), args.agents, prefix="chaos-agent",
                            env={"BENCH_CHAOS_MARK": mark}).start()
            wait_for_workers(server.url, token, agents.worker_ids())
            command = f'echo "$DISPATCH_JOB_ID" >> {shlex.quote(str(ran_file))}'
            if args.job_seconds > 0:
                command += f"; sleep {args.job_seconds:g}"
            expected = args.cycles * (args.min_up + args.max_up) / 2 + args.cycles * 0.7
            interval = max(0.0, expected / max(args.jobs, 1) * 0.8)
            submitter = Submitter([s.port for s in servers], token, args.jobs, command, interval,
                                  deadline=time.monotonic() + expected + 120)
            submitter.start()

            downtimes = []
            for cycle in range(args.cycles):
                time.sleep(rng.uniform(args.min_up, args.max_up))
                server = rng.choice(servers)
                server.kill9()
                down = time.monotonic()
                if rng.random() < 0.3:
                    time.sleep(rng.uniform(0, 0.5))  # sometimes stay down a little longer
                server.start()
                downtimes.append(time.monotonic() - down)
                print(f"  kill {cycle + 1} ({server.url}): acknowledged so far {len(submitter.acknowledged)}, "
                      f"down {downtimes[-1]:.2f} s", flush=True)
            submitter.join(expected + 120)

            # Every acknowledged job must finish, on the agents that lived through it all.
            # Wait while they make progress: give up only after --settle seconds without one finishing.
            acknowledged = list(submitter.acknowledged)
            last_progress, last_pending = time.monotonic(), None
            hard_deadline = time.monotonic() + 900
            while True:
                rows = {r["id"]: r for r in job_rows(server, database)}
                pending = [j for j in acknowledged if j in rows and rows[j]["status"] not in FINISHED]
                if last_pending is None or len(pending) < last_pending:
                    last_progress, last_pending = time.monotonic(), len(pending)
                if not pending or time.monotonic() - last_progress > args.settle or time.monotonic() > hard_deadline:
                    break
                time.sleep(0.2)
            agents.stop(timeout=30)  # SIGTERM twice: running jobs are killed and reported
            time.sleep(0.5)
            orphans = marked_processes(mark)
            for pid in orphans:  # leave nothing behind
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        finally:
            if agents:
                agents.stop()
            for each in servers:
                each.stop()

        runs = collections.Counter(ran_file.read_text().split())
        missing = [j for j in acknowledged if j not in rows]
        stuck = [j for j in acknowledged if j in rows and rows[j]["status"] not in FINISHED]
        failed = [j for j in acknowledged if j in rows and rows[j]["status"] == "failed"]
        duplicated = [j for j in acknowledged if runs[j] > 1]
        completed_unrun = [j for j in acknowledged if rows.get(j, {}).get("status") == "completed" and not runs[j]]
        extra = [j for j in rows if j not in set(acknowledged)]
        lost = len(missing) + len(stuck)
        print(f"\nacknowledged={len(acknowledged)} lost={lost} duplicated={len(duplicated)} orphaned={len(orphans)}")
        if stuck:
            states = collections.Counter(rows[j]["status"] for j in stuck)
            print(f"  never finished (no job finished for {args.settle:g} s): " +
                  ", ".join(f"{n} {state}" for state, n in states.items()))
        print(f"  details: kills {args.cycles}, downtime {min(downtimes, default=0):.2f}-{max(downtimes, default=0):.2f} s;"
              f" missing {len(missing)}, never finished {len(stuck)}, failed {len(failed)}, completed without running "
              f"{len(completed_unrun)}; submits refused (server down) {submitter.refused}, ambiguous "
              f"{submitter.ambiguous} -> unacknowledged jobs that exist {len(extra)}; re-run attempts "
              f"{sum(1 for j in acknowledged if rows.get(j, {}).get('attempt', 1) > 1)}")
        for label, ids in (("missing", missing), ("never finished", stuck), ("failed", failed),
                           ("duplicated", duplicated), ("completed without running", completed_unrun)):
            for j in ids[:5]:
                print(f"  {label}: {j} {rows.get(j)} ran {runs[j]}x")
        if submitter.errors:
            print(f"  first ambiguous submit errors: {submitter.errors[:3]}")
        if len(acknowledged) < args.jobs:
            print(f"  (only {len(acknowledged)} of {args.jobs} submits were acknowledged in time)")
        print(f"(chaos took {time.monotonic() - started:.0f} s)")
        bad = lost or duplicated or orphans or failed or completed_unrun or len(acknowledged) < args.jobs
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
