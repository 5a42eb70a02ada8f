#!/usr/bin/env python3
"""dispatch benchmarks: a real ``dispatch.py`` and real ``agent.py`` processes on loopback.

    python bench/throughput.py --jobs 2000 --agents 4 [--runs 3]   # drain throughput, CPU, RSS
    python bench/throughput.py --latency                           # pickup p50/p99 at 10/50/80 %
    python bench/throughput.py --peers                             # against Celery and RQ (+ Redis)
    python bench/throughput.py --big-output 100                    # 100 MB of output, short jobs flow
    python bench/throughput.py --idle-agents 1000                  # 1,000 long-polling agents
    python bench/throughput.py --upload 500                        # one 500 MB upload
    python bench/throughput.py --upload 500 --postgres postgresql://postgres@127.0.0.1/postgres  # stored there
    python bench/throughput.py --postgres postgresql://postgres@127.0.0.1/postgres [--servers 2]  # also --latency
    python bench/throughput.py --farm 5000                         # 5,000 parked agents (issue 12)

Every figure comes from real processes on 127.0.0.1: the server's and agents' CPU is read
from /proc (user + system, with the children they reaped, so the jobs' own processes count),
memory from VmRSS/VmHWM. Throughput is N jobs of ``true`` preloaded while the warm agents are
paused (SIGSTOP), then drained (SIGCONT until the last job's ``completedAt``). Pickup latency
is submit (client clock, just before the request) to the command's own ``date +%s.%N``.

Linux only (/proc, SIGSTOP). --peers needs ``pip install -r bench/requirements-bench.txt``
and ``redis-server`` on the PATH (a private instance is started on a free port).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp  # noqa: E402

from _common import (  # noqa: E402
    BENCH, REGISTRATION_TOKEN, Agents, DispatchServer, PostgresDatabase, RssSampler, Workspace, api_call, cpu_seconds,
    fmt_range, free_port, login, open_files, parse_iso, peak_rss_mb, percentile, print_banner, reset_peak_rss, rss_mb,
    stop_tree, tree_cpu_seconds, wait_for_workers)
from _sim_agents import POLL_WAIT_SECONDS  # noqa: E402  agent.py's, mirrored

FINISHED_SQL = "status IN ('completed', 'failed', 'cancelled')"


def stamp_command(stamps: Path, tag: str) -> str:
    """A job that appends its own start time (and a tag naming it) to the stamps file."""
    return f'date "+%s.%N {tag}" >> {shlex.quote(str(stamps))}'


def read_stamps(path: Path) -> dict[str, float]:
    stamps = {}
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                stamps[parts[1]] = float(parts[0])
    return stamps


def wait_for_stamps(path: Path, tags, timeout: float) -> dict[str, float]:
    wanted = set(tags)
    deadline = time.monotonic() + timeout
    while True:
        stamps = read_stamps(path)
        if wanted <= stamps.keys() or time.monotonic() > deadline:
            return stamps
        time.sleep(0.05)


def latency_summary(submitted: dict[str, float], stamps: dict[str, float]) -> dict:
    lat = [(stamps[t] - s) * 1000 for t, s in submitted.items() if t in stamps]
    return {"n": len(lat), "missing": len(submitted) - len(lat), "p50": percentile(lat, 50),
            "p90": percentile(lat, 90), "p99": percentile(lat, 99), "max": max(lat) if lat else float("nan")}


def fmt_lat(s: dict) -> str:
    miss = f", {s['missing']} missing" if s["missing"] else ""
    return (f"n={s['n']}{miss}  p50 {s['p50']:.1f} ms  p90 {s['p90']:.1f} ms  p99 {s['p99']:.1f} ms  "
            f"max {s['max']:.1f} ms")


# =============================================================================================
# dispatch: a server, K agents, an aiohttp client
# =============================================================================================


class DispatchClient:
    """The submitting side, over one keep-alive aiohttp session."""

    def __init__(self, url: str, token: str, limit: int = 64):
        self.url, self.token, self.limit = url, token, limit
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "DispatchClient":
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.limit),
                                             headers={"Authorization": f"Bearer {self.token}"},
                                             timeout=aiohttp.ClientTimeout(total=120))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    async def submit(self, command: str, **fields) -> str:
        async with self.session.post(self.url + "/api/jobs/submit",
                                     json={"command": command, "timeout": 120, **fields}) as resp:
            body = await resp.json()
            if resp.status != 201:
                raise RuntimeError(f"submit answered {resp.status}: {body}")
            return body["jobId"]

    async def submit_all(self, commands: list[str], concurrency: int) -> list[str]:
        ids: list[str | None] = [None] * len(commands)
        position = iter(range(len(commands)))

        async def worker() -> None:
            for i in position:
                ids[i] = await self.submit(commands[i])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return ids

    async def paced(self, commands: dict[str, str], rate: float) -> dict[str, float]:
        """Submit open-loop at a fixed rate (not waiting for answers); {tag: submit time}."""
        submitted: dict[str, float] = {}
        tasks = []
        start = time.monotonic()

        async def one(tag: str, command: str) -> None:
            submitted[tag] = time.time()
            await self.submit(command)

        for i, (tag, command) in enumerate(commands.items()):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(tag, command)))
        await asyncio.gather(*tasks)
        return submitted


class DispatchFarm:
    """Real dispatch.py processes (one on SQLite; or ``servers`` on the PostgreSQL ``database``) and
    K real agent.py processes, warm and registered. Jobs are submitted to the first server; the
    agents poll the last one, so with two servers every pickup crosses from one server to the other."""

    name = "dispatch"

    def __init__(self, root: Path, agents: int, *, durability: str = "normal", server_env: dict | None = None,
                 concurrency: int = 1, database: PostgresDatabase | None = None, servers: int = 1,
                 **server_options):
        self.root = root
        self.database = database
        env = {**(server_env or {}), **({"DISPATCH_DATABASE_URL": database.url} if database else {})}
        self.servers = [DispatchServer(root / f"server-{n}" if n else root / "server", durability=durability,
                                       env=env, **server_options) for n in range(servers)]
        self.server = self.servers[0]
        self.agent_count = agents
        self.concurrency = concurrency
        self.agents: Agents | None = None
        self.token = ""

    def start(self) -> "DispatchFarm":
        for server in self.servers:
            server.start()
        self.token = login(self.server.url)
        if self.agent_count:
            self.agents = Agents(self.root / "agents", self.servers[-1].url, self.agent_count,
                                 concurrency=self.concurrency).start()
            wait_for_workers(self.server.url, self.token, self.agents.worker_ids())
        return self

    def stop(self) -> None:
        if self.agents:
            self.agents.stop()
        for server in self.servers:
            server.stop()

    def server_cpu_seconds(self) -> float:
        """All the servers' CPU (not PostgreSQL's own)."""
        return sum(cpu_seconds(server.pid) for server in self.servers)

    def rows(self, sql: str) -> list:
        """A query's rows from the jobs database, whichever engine."""
        if self.database:
            return self.database.rows(sql)
        with self.server.db() as db:
            return db.execute(sql).fetchall()

    def client(self, limit: int = 64) -> DispatchClient:
        return DispatchClient(self.server.url, self.token, limit)

    def finished(self) -> tuple[int, int]:
        """(finished jobs, failed jobs) from the database."""
        [row] = self.rows(f"SELECT SUM(CASE WHEN {FINISHED_SQL} THEN 1 ELSE 0 END) AS done,"
                          " SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) AS failed FROM jobs")
        return row["done"] or 0, row["failed"] or 0

    def max_seq(self) -> int:
        return self.rows("SELECT COALESCE(MAX(seq), 0) AS seq FROM jobs")[0]["seq"]

    def wait_finished(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.finished()[0] < count:
            if time.monotonic() > deadline:
                return False
            if self.agents and not self.agents.alive():
                raise RuntimeError("an agent exited:\n" + self.agents.logs())
            time.sleep(0.05)
        return True

    async def warm_up(self, jobs: int) -> None:
        before = self.finished()[0]
        async with self.client() as client:
            await client.submit_all(["true"] * jobs, 4)
        if not self.wait_finished(before + jobs, 60):
            raise RuntimeError("warm-up jobs did not finish:\n" + (self.agents.logs() if self.agents else ""))


class Profiler:
    """py-spy record on a pid while a block runs (raw collapsed stacks + an SVG flame graph)."""

    def __init__(self, pid: int, out: Path, *, idle: bool = False, rate: int = 200):
        self.pid, self.out, self.idle, self.rate = pid, out, idle, rate
        self.procs: list[subprocess.Popen] = []

    def __enter__(self):
        spy = Path(sys.executable).parent / "py-spy"
        spy = str(spy) if spy.exists() else "py-spy"
        for fmt, suffix in (("raw", ".txt"), ("flamegraph", ".svg")):
            cmd = [spy, "record", "--pid", str(self.pid), "--rate", str(self.rate), "--format", fmt,
                   "-o", str(self.out) + suffix] + (["--idle"] if self.idle else [])
            if not os.environ.get("BENCH_PYSPY_BLOCKING"):
                cmd.append("--nonblocking")
            self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        time.sleep(0.5)  # let it attach
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


async def dispatch_drain(farm: DispatchFarm, n: int, *, concurrency: int, cap: float,
                         profile: Path | None = None) -> dict:
    """Preload n `true` jobs while the agents are paused, then drain; jobs/s and CPU per job."""
    server_pid = farm.server.pid
    base_done, base_seq = farm.finished()[0], farm.max_seq()
    farm.agents.pause()
    s0, c0, w0 = farm.server_cpu_seconds(), time.process_time(), time.monotonic()
    async with farm.client(concurrency) as client:
        await client.submit_all(["true"] * n, concurrency)
    s1, c1, w1 = farm.server_cpu_seconds(), time.process_time(), time.monotonic()
    a1 = farm.agents.cpu_seconds()
    profilers = []
    if profile:
        profilers = [Profiler(server_pid, profile / "server"),
                     Profiler(farm.agents.pids[0], profile / "agent-wall", idle=True),
                     Profiler(farm.agents.pids[1 % len(farm.agents.pids)], profile / "agent-cpu")]
        for p in profilers:
            p.__enter__()
    t0 = time.time()
    farm.agents.resume()
    complete = farm.wait_finished(base_done + n, cap)
    t_seen = time.time()
    s2, a2 = farm.server_cpu_seconds(), farm.agents.cpu_seconds()
    for p in profilers:
        p.__exit__(None, None, None)
    [row] = farm.rows(f"SELECT COUNT(*) AS done, SUM(CASE WHEN status = 'completed' THEN 1 ELSE 0 END) AS ok,"
                      f" MAX(completed_at) AS last FROM jobs WHERE seq > {int(base_seq)} AND {FINISHED_SQL}")
    done = row["done"]
    t_end = parse_iso(row["last"]) if complete and row["last"] else t_seen
    drain = max(t_end - t0, 1e-6)
    return {
        "jobs": n, "done": done, "ok": row["ok"] or 0, "complete": complete,
        "jobs_s": done / drain, "drain_s": drain,
        "submit_jobs_s": n / (w1 - w0),
        "server_submit_ms": (s1 - s0) / n * 1000, "client_submit_ms": (c1 - c0) / n * 1000,
        "server_drain_ms": (s2 - s1) / max(done, 1) * 1000, "agents_ms": (a2 - a1) / max(done, 1) * 1000,
        "peak_rss_mb": peak_rss_mb(server_pid),
    }


async def sim_drain(farm: DispatchFarm, n: int, agents: int, *, concurrency: int, cap: float, exec_true: bool,
                    profile: Path | None = None, keepalive: bool = True, delay: float = 0.0) -> dict:
    """The server alone: n jobs preloaded, then drained by `agents` protocol-only agents in this
    process (keep-alive aiohttp, get-job?wait=30 -> [run `true`] -> submit-result), no agent.py."""
    server_pid = farm.server.pid
    tokens = []
    for i in range(agents):
        status, body = api_call(farm.server.url, "POST", "/api/workers/register",
                                {"workerId": f"sim-{uuid.uuid4().hex[:8]}-{i}", "hostname": "sim"},
                                token=REGISTRATION_TOKEN)
        tokens.append(body["token"])
    base_seq = farm.max_seq()
    submit_profiler = Profiler(server_pid, profile / "server-submit") if profile else None
    if submit_profiler:
        submit_profiler.__enter__()
    s0, c0, w0 = farm.server_cpu_seconds(), time.process_time(), time.monotonic()
    async with farm.client(concurrency) as client:
        await client.submit_all(["true"] * n, concurrency)
    s1, c1, w1 = farm.server_cpu_seconds(), time.process_time(), time.monotonic()
    if submit_profiler:
        submit_profiler.__exit__(None, None, None)
    done_count = 0
    finished = asyncio.Event()
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=not keepalive),
                                    timeout=aiohttp.ClientTimeout(total=60))

    async def agent(token: str) -> None:
        nonlocal done_count
        headers = {"x-worker-token": token}
        while not finished.is_set():
            async with session.get(farm.server.url + "/api/jobs/get-job?wait=30", headers=headers) as resp:
                if resp.status != 200:
                    continue
                job = (await resp.json())["job"]
            exit_code = 0
            if delay:
                await asyncio.sleep(delay)
            if exec_true:
                proc = await asyncio.create_subprocess_exec("true")
                exit_code = await proc.wait()
            async with session.post(farm.server.url + "/api/jobs/submit-result", headers=headers,
                                    json={"jobId": job["jobId"], "exitCode": exit_code, "stdout": "", "stderr": "",
                                          "attempt": job["attempt"]}) as resp:
                await resp.read()
            done_count += 1
            if done_count >= n:
                finished.set()

    profilers = [Profiler(server_pid, profile / "server-sim")] if profile else []
    for p in profilers:
        p.__enter__()
    c1 = time.process_time()
    t0 = time.time()
    tasks = [asyncio.ensure_future(agent(t)) for t in tokens]
    try:
        await asyncio.wait_for(finished.wait(), cap)
        complete = True
    except asyncio.TimeoutError:
        complete = False
    t_seen = time.time()
    s2, c2 = farm.server_cpu_seconds(), time.process_time()
    for p in profilers:
        p.__exit__(None, None, None)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await session.close()
    [row] = farm.rows(f"SELECT COUNT(*) AS done, SUM(CASE WHEN status = 'completed' THEN 1 ELSE 0 END) AS ok,"
                      f" MAX(completed_at) AS last FROM jobs WHERE seq > {int(base_seq)} AND {FINISHED_SQL}")
    t_end = parse_iso(row["last"]) if complete and row["last"] else t_seen
    drain = max(t_end - t0, 1e-6)
    done = row["done"]
    return {"jobs": n, "done": done, "ok": row["ok"] or 0, "complete": complete, "jobs_s": done / drain,
            "drain_s": drain, "submit_jobs_s": n / (w1 - w0), "server_submit_ms": (s1 - s0) / n * 1000,
            "client_submit_ms": (c1 - c0) / n * 1000, "server_drain_ms": (s2 - s1) / max(done, 1) * 1000,
            "agents_ms": (c2 - c1) / max(done, 1) * 1000, "peak_rss_mb": peak_rss_mb(server_pid)}


def print_drain(r: dict, label: str = "") -> None:
    total = r["server_submit_ms"] + r["client_submit_ms"] + r["server_drain_ms"] + r["agents_ms"]
    r["total_ms"] = total
    cap = "" if r["complete"] else f"  (CAPPED: {r['done']}/{r['jobs']} finished)"
    bad = f"  ({r['done'] - r['ok']} not completed!)" if r["ok"] != r["done"] else ""
    print(f"{label}{r['jobs_s']:7.1f} jobs/s  (drain {r['drain_s']:.2f} s; preload {r['submit_jobs_s']:.0f} submits/s)"
          f"{cap}{bad}\n"
          f"      CPU-s per 1,000 jobs (= ms/job): server {r['server_drain_ms']:.2f} drain + "
          f"{r['server_submit_ms']:.2f} submit; agents+jobs {r['agents_ms']:.2f}; client {r['client_submit_ms']:.2f};"
          f" total {total:.2f}\n"
          f"      peak server RSS {r['peak_rss_mb']:.1f} MB", flush=True)


def postgres_for(args):
    """A fresh PostgreSQL database for the run when asked for (--postgres), else nothing."""
    if args.servers > 1 and not args.postgres:
        raise SystemExit("--servers > 1 needs --postgres URL (servers share a PostgreSQL database)")
    return PostgresDatabase(args.postgres) if args.postgres else contextlib.nullcontext()


def where(args) -> str:
    if not args.postgres:
        return "; SQLite"
    return (f"; PostgreSQL, {args.servers} servers (submits to the first, agents on the last: every pickup crosses"
            f" between servers)" if args.servers > 1 else "; PostgreSQL, 1 server") + \
        " (server CPU below is dispatch.py's, not PostgreSQL's)"


def mode_throughput(args) -> int:
    if args.sim_agents:
        print(f"-- server throughput: {args.jobs} jobs, {args.agents} protocol-only agents in the bench process "
              f"(no agent.py; {'each runs `true`' if args.sim_exec else 'no process per job'}; "
              f"{'a connection per request' if args.sim_no_keepalive else 'keep-alive'}), {args.runs} run(s);"
              f" 'agents' CPU below is the bench process's")
    else:
        print(f"-- throughput: {args.jobs} jobs of `true`, {args.agents} agents, {args.runs} run(s){where(args)}")
    results = []
    for run in range(args.runs):
        with Workspace(args.keep) as ws, postgres_for(args) as database:
            farm = DispatchFarm(ws, 0 if args.sim_agents else args.agents, database=database,
                                servers=args.servers).start()
            try:
                profile = None
                if args.profile and run == 0:
                    profile = Path(args.profile)
                    profile.mkdir(parents=True, exist_ok=True)
                if args.sim_agents:
                    r = asyncio.run(sim_drain(farm, args.jobs, args.agents, concurrency=args.submit_concurrency,
                                              cap=args.cap, exec_true=args.sim_exec, profile=profile,
                                              keepalive=not args.sim_no_keepalive, delay=args.sim_delay))
                else:
                    asyncio.run(farm.warm_up(args.warmup))
                    r = asyncio.run(dispatch_drain(farm, args.jobs, concurrency=args.submit_concurrency,
                                                   cap=args.cap, profile=profile))
            finally:
                farm.stop()
        print_drain(r, f"run {run + 1}: ")
        results.append(r)
    if len(results) > 1:
        print("summary over runs (min–max (median)):")
        print(f"  jobs/s              {fmt_range([r['jobs_s'] for r in results])}")
        print(f"  server ms/job drain {fmt_range([r['server_drain_ms'] for r in results], '{:.2f}')}")
        print(f"  server ms/job submit{fmt_range([r['server_submit_ms'] for r in results], ' {:.2f}')}")
        print(f"  agents ms/job       {fmt_range([r['agents_ms'] for r in results], '{:.2f}')}")
        print(f"  client ms/job       {fmt_range([r['client_submit_ms'] for r in results], '{:.2f}')}")
        print(f"  total ms/job        {fmt_range([r['total_ms'] for r in results], '{:.2f}')}")
        print(f"  peak server RSS MB  {fmt_range([r['peak_rss_mb'] for r in results], '{:.1f}')}")
    if args.profile:
        print(f"profiles (py-spy, first run's drain): {args.profile}/server.svg, agent-wall.svg, agent-cpu.svg;"
              f" summarise with: python bench/profile_summary.py {args.profile}/server.txt")
    return 0 if all(r["complete"] and r["ok"] == r["done"] for r in results) else 1


# =============================================================================================
# --latency
# =============================================================================================


async def dispatch_probes(farm: DispatchFarm, stamps: Path, prefix: str, count: int, interval: float) -> dict:
    """Idle probes: one job at a time, `interval` apart; {tag: submit time}."""
    submitted = {}
    async with farm.client(4) as client:
        for i in range(count):
            tag = f"{prefix}{i}"
            submitted[tag] = time.time()
            await client.submit(stamp_command(stamps, tag))
            await asyncio.sleep(interval)
    return submitted


def dispatch_breakdown(farm: DispatchFarm, stamps: dict[str, float], submitted: dict[str, float]) -> str:
    """Where the pickup time goes, from the server's own timestamps (ms precision)."""
    rows = []
    for job in farm.rows("SELECT command, created_at, started_at FROM jobs WHERE started_at IS NOT NULL"):
        tag = job["command"].split('"')[1].split()[-1] if '"' in job["command"] else None
        if tag in submitted and tag in stamps:
            rows.append((parse_iso(job["created_at"]) - submitted[tag], parse_iso(job["started_at"]) -
                         parse_iso(job["created_at"]), stamps[tag] - parse_iso(job["started_at"])))
    if not rows:
        return ""
    parts = [percentile([r[i] * 1000 for r in rows], 50) for i in range(3)]
    return (f"      p50 split (server clock, 1 ms resolution): submit→row {parts[0]:.1f} ms, row→claimed "
            f"{parts[1]:.1f} ms, claimed→command runs {parts[2]:.1f} ms")


def mode_latency(args) -> int:
    print(f"-- latency: {args.agents} idle warm agents; submit → command start (its own `date +%s.%N`)"
          f"{where(args)}")
    with Workspace(args.keep) as ws, postgres_for(args) as database:
        farm = DispatchFarm(ws, args.agents, database=database, servers=args.servers).start()
        try:
            asyncio.run(farm.warm_up(args.warmup))
            base = args.rate
            if not base:
                r = asyncio.run(dispatch_drain(farm, args.latency_jobs, concurrency=args.submit_concurrency,
                                               cap=args.cap))
                print_drain(r, "throughput for the pace: ")
                base = r["jobs_s"]
            stamps = ws / "stamps"
            submitted = asyncio.run(dispatch_probes(farm, stamps, "idle", args.probes, args.probe_interval))
            got = wait_for_stamps(stamps, submitted, 30)
            print(f"idle probe ({1 / args.probe_interval:.0f}/s): {fmt_lat(latency_summary(submitted, got))}")
            print(dispatch_breakdown(farm, got, submitted))
            for fraction in (0.1, 0.5, 0.8):
                rate = base * fraction
                count = max(10, int(rate * args.phase_seconds))
                commands = {f"r{int(fraction * 100)}-{i}": None for i in range(count)}
                commands = {tag: stamp_command(stamps, tag) for tag in commands}

                async def run() -> dict:
                    async with farm.client(256) as client:
                        return await client.paced(commands, rate)

                sub = asyncio.run(run())
                got = wait_for_stamps(stamps, sub, 60)
                print(f"{int(fraction * 100):3d}% pace ({rate:.0f} jobs/s, {count} jobs): "
                      f"{fmt_lat(latency_summary(sub, got))}")
                print(dispatch_breakdown(farm, got, sub), flush=True)
                farm.wait_finished(farm.max_seq(), 30)
        finally:
            farm.stop()
    return 0


# =============================================================================================
# --peers: Celery + Redis, RQ + Redis
# =============================================================================================


class RedisServer:
    """A private redis-server on a free loopback port: no snapshots (normal), or AOF with
    appendfsync always (full)."""

    def __init__(self, root: Path, durability: str):
        self.root = root
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.durability = durability
        self.process = None

    def start(self) -> "RedisServer":
        self.root.mkdir(parents=True, exist_ok=True)
        persist = (["--appendonly", "yes", "--appendfsync", "always"] if self.durability == "full"
                   else ["--appendonly", "no"])
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.root),
             "--logfile", str(self.root / "redis.log"), *persist], stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        import redis

        self.client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def _utc_epoch(value) -> float:
    import datetime as dt

    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.timestamp()


class CeleryFarm:
    """Celery worker, prefork -c K, --prefetch-multiplier=1, acks_late, Redis broker and results."""

    def __init__(self, root: Path, workers: int, redis: RedisServer):
        self.name = f"Celery + Redis (prefork -c {workers})"
        self.root, self.workers, self.redis = root, workers, redis
        self.process = None
        self.task_ids: list[str] = []

    def start(self) -> "CeleryFarm":
        import peer_tasks

        self.app = peer_tasks.make_celery(self.redis.url)
        env = {**os.environ, "BENCH_REDIS_URL": self.redis.url, "PYTHONPATH": str(BENCH)}
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = self.root / "celery.log"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "peer_tasks", "worker", "-P", "prefork", "-c",
                 str(self.workers), "--prefetch-multiplier=1", "-n", f"bench-{uuid.uuid4().hex[:6]}@%h"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=self.root)
        deadline = time.monotonic() + 60
        while not self.app.control.ping(timeout=0.5):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("celery worker did not start:\n" + self.log.read_text()[-3000:])
        return self

    @property
    def pids(self) -> list[int]:
        return [self.process.pid]

    def submit_true(self) -> str:
        return self.app.send_task("bench.true").id

    def submit_shell(self, command: str) -> str:
        return self.app.send_task("bench.shell", args=[command]).id

    def idle(self) -> bool:
        r = self.redis.client
        return r.llen("celery") == 0 and r.hlen("unacked") == 0

    def results(self, ids: list[str]) -> list[dict]:
        raw = self.redis.client.mget([f"celery-task-meta-{i}" for i in ids])
        return [json.loads(x) for x in raw if x]

    def drain_until(self, ids: list[str], _base: int, cap: float) -> bool:
        """Until every result is stored. LLEN and HLEN are O(1); the MGET of all results runs only
        once the queue is empty and nothing is unacknowledged."""
        deadline = time.monotonic() + cap
        while not (self.idle() and len(self.results(ids)) == len(ids)):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def end_times(self, ids: list[str]) -> tuple[int, int, float]:
        res = self.results(ids)
        ok = sum(1 for m in res if m.get("status") == "SUCCESS")
        return len(res), ok, max((_utc_epoch(m["date_done"]) for m in res), default=float("nan"))

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            stop_tree(self.pids, signal.SIGCONT)
            self.process.send_signal(signal.SIGQUIT)  # cold shutdown
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                for pid in [self.process.pid]:
                    stop_tree([pid], signal.SIGKILL)
                self.process.wait(5)


class RQFarm:
    """K `rq worker` processes: the default Worker (a forked work horse per job) or SimpleWorker."""

    def __init__(self, root: Path, workers: int, redis: RedisServer, simple: bool):
        kind = "SimpleWorker" if simple else "Worker"
        self.name = f"RQ + Redis ({workers} x {kind})"
        self.root, self.workers, self.redis, self.simple = root, workers, redis, simple
        self.processes: list[subprocess.Popen] = []

    def start(self) -> "RQFarm":
        import rq

        import peer_tasks

        self.peer_tasks = peer_tasks
        self.queue = rq.Queue("bench", connection=self.redis.client)
        env = {**os.environ, "BENCH_REDIS_URL": self.redis.url, "PYTHONPATH": str(BENCH)}
        rq_cli = Path(sys.executable).parent / "rq"
        self.root.mkdir(parents=True, exist_ok=True)
        for i in range(self.workers):
            cls = ["-w", "rq.worker.SimpleWorker"] if self.simple else []
            with open(self.root / f"rq-{i}.log", "ab") as log:
                self.processes.append(subprocess.Popen(
                    [str(rq_cli), "worker", "--url", self.redis.url, *cls, "-n", f"bench-{uuid.uuid4().hex[:8]}",
                     "bench"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=self.root))
        deadline = time.monotonic() + 60
        while rq.Worker.count(connection=self.redis.client, queue=self.queue) < self.workers:
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.processes):
                raise RuntimeError("rq workers did not start:\n" + (self.root / "rq-0.log").read_text()[-3000:])
            time.sleep(0.1)
        time.sleep(0.5)  # into their BLPOP
        return self

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def submit_true(self) -> str:
        return self.queue.enqueue(self.peer_tasks.run_true).id

    def submit_shell(self, command: str) -> str:
        return self.queue.enqueue(self.peer_tasks.run_shell, command).id

    def finished_count(self) -> int:
        return self.queue.finished_job_registry.get_job_count() + self.queue.failed_job_registry.get_job_count()

    def drain_until(self, ids: list[str], base_done: int, cap: float) -> bool:
        deadline = time.monotonic() + cap
        while self.finished_count() - base_done < len(ids):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def end_times(self, ids: list[str]) -> tuple[int, int, float]:
        import rq

        jobs = [j for j in rq.job.Job.fetch_many(ids, connection=self.redis.client) if j is not None]
        done = [j for j in jobs if j.ended_at is not None]
        ok = sum(1 for j in done if j.get_status() == "finished")
        return len(done), ok, max((_utc_epoch(j.ended_at) for j in done), default=float("nan"))

    def stop(self) -> None:
        stop_tree(self.pids, signal.SIGCONT)
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.send_signal(signal.SIGTERM)
        for p in self.processes:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def peer_drain(farm, redis: RedisServer, n: int, cap: float) -> dict:
    """The same preload-while-paused, drain-on-SIGCONT measurement for a Celery or RQ farm."""
    worker_pids = farm.pids
    if isinstance(farm, RQFarm):
        base = farm.finished_count()
    else:
        base = 0
    stop_tree(worker_pids, signal.SIGSTOP)
    time.sleep(0.2)
    r0, c0, w0 = cpu_seconds(redis.pid), time.process_time(), time.monotonic()
    ids = [farm.submit_true() for _ in range(n)]
    r1, c1, w1 = cpu_seconds(redis.pid), time.process_time(), time.monotonic()
    k1 = tree_cpu_seconds(worker_pids)
    t0 = time.time()
    stop_tree(worker_pids, signal.SIGCONT)
    complete = farm.drain_until(ids, base, cap)
    t_seen = time.time()
    r2, k2 = cpu_seconds(redis.pid), tree_cpu_seconds(worker_pids)
    done, ok, last = farm.end_times(ids)
    t_end = last if complete and last == last else t_seen
    drain = max(t_end - t0, 1e-6)
    return {"jobs": n, "done": done, "ok": ok, "complete": complete, "jobs_s": done / drain, "drain_s": drain,
            "submit_jobs_s": n / (w1 - w0), "server_submit_ms": (r1 - r0) / n * 1000,
            "client_submit_ms": (c1 - c0) / n * 1000, "server_drain_ms": (r2 - r1) / max(done, 1) * 1000,
            "agents_ms": (k2 - k1) / max(done, 1) * 1000, "peak_rss_mb": peak_rss_mb(redis.pid)}


def peer_probes(farm, stamps: Path, prefix: str, count: int, interval: float) -> dict:
    submitted = {}
    for i in range(count):
        tag = f"{prefix}{i}"
        submitted[tag] = time.time()
        farm.submit_shell(stamp_command(stamps, tag))
        time.sleep(interval)
    return submitted


def mode_peers(args) -> int:
    try:
        import celery  # noqa: F401
        import redis  # noqa: F401
        import rq  # noqa: F401
    except ImportError as err:
        print(f"--peers needs the bench requirements: pip install -r bench/requirements-bench.txt ({err})")
        return 2
    durability = {"normal": "Redis without snapshots or AOF vs SQLite WAL synchronous=NORMAL (dispatch's setting)",
                  "full": "Redis AOF appendfsync always vs SQLite WAL synchronous=FULL (bench/_dispatch_full.py)"}
    print(f"-- peers: {args.jobs} jobs of `true` (peers: subprocess.run(['true']) in the task), {args.agents} "
          f"workers each, {args.runs} round(s), alternating order\n   durability: {durability[args.durability]}\n"
          f"   pickup: {args.probes} idle probes {args.probe_interval:g} s apart, submit → `date +%s.%N` "
          f"(via sh, the same command everywhere)")
    systems = ["dispatch", "celery", "rq", "rq-simple"]
    if args.peer_systems:
        systems = args.peer_systems.split(",")
    table: dict[str, list[dict]] = {}
    for rnd in range(args.runs):
        order = systems if rnd % 2 == 0 else list(reversed(systems))
        for system in order:
            with Workspace(args.keep) as ws:
                print(f"[round {rnd + 1}] {system} ...", flush=True)
                try:
                    r = run_one_system(system, ws, args)
                except Exception as err:  # one broken peer must not hide the others
                    print(f"   {system} failed: {err!r}")
                    continue
                print_drain(r, f"   {r['name']}: ")
                print(f"      pickup {fmt_lat(r['lat'])}", flush=True)
                table.setdefault(system, []).append(r)
    print_peers_table(table)
    return 0


def run_one_system(system: str, ws: Path, args) -> dict:
    stamps = ws / "stamps"
    if system == "dispatch":
        farm = DispatchFarm(ws, args.agents, durability=args.durability).start()
        try:
            asyncio.run(farm.warm_up(args.warmup))
            r = asyncio.run(dispatch_drain(farm, args.jobs, concurrency=args.submit_concurrency, cap=args.cap))
            sub = asyncio.run(dispatch_probes(farm, stamps, "p", args.probes, args.probe_interval))
            r["lat"] = latency_summary(sub, wait_for_stamps(stamps, sub, 30))
            r["name"] = f"dispatch ({args.agents} agents)"
            return r
        finally:
            farm.stop()
    redis = RedisServer(ws / "redis", args.durability).start()
    farm = None
    try:
        if system == "celery":
            farm = CeleryFarm(ws / "celery", args.agents, redis).start()
        elif system in ("rq", "rq-simple"):
            farm = RQFarm(ws / "rq", args.agents, redis, simple=system == "rq-simple").start()
        else:
            raise ValueError(f"unknown system {system}")
        warm = [farm.submit_true() for _ in range(args.warmup)]
        if isinstance(farm, CeleryFarm):
            deadline = time.monotonic() + 60
            while len(farm.results(warm)) < len(warm) and time.monotonic() < deadline:
                time.sleep(0.05)
        else:
            farm.drain_until(warm, 0, 60)
        r = peer_drain(farm, redis, args.jobs, args.cap)
        sub = peer_probes(farm, stamps, "p", args.probes, args.probe_interval)
        r["lat"] = latency_summary(sub, wait_for_stamps(stamps, sub, 30))
        r["name"] = farm.name
        return r
    finally:
        if farm:
            farm.stop()
        redis.stop()


def print_peers_table(table: dict[str, list[dict]]) -> None:
    if not table:
        return
    med = lambda rows, key: statistics.median([r[key] for r in rows])  # noqa: E731
    disp = table.get("dispatch")
    print("\n| system | jobs/s | pickup p50 / p99 (ms) | CPU ms/job: broker/server + workers (drain) | "
          "+ submit (client + server) | total | dispatch jobs/s ÷ this | dispatch CPU ÷ this |")
    print("|---|---|---|---|---|---|---|---|")
    for system, rows in table.items():
        for r in rows:
            r["total_ms"] = r["server_submit_ms"] + r["client_submit_ms"] + r["server_drain_ms"] + r["agents_ms"]
        jobs = fmt_range([r["jobs_s"] for r in rows])
        p50 = fmt_range([r["lat"]["p50"] for r in rows], "{:.1f}")
        p99 = fmt_range([r["lat"]["p99"] for r in rows], "{:.1f}")
        drain = fmt_range([r["server_drain_ms"] + r["agents_ms"] for r in rows], "{:.2f}")
        submit = fmt_range([r["server_submit_ms"] + r["client_submit_ms"] for r in rows], "{:.2f}")
        total = fmt_range([r["total_ms"] for r in rows], "{:.2f}")
        ratio = cpu_ratio = "—"
        if disp and system != "dispatch":
            ratio = f"{med(disp, 'jobs_s') / med(rows, 'jobs_s'):.2f}x"
            cpu_ratio = f"{med(disp, 'total_ms') / med(rows, 'total_ms'):.2f}x"
        print(f"| {rows[0]['name']} | {jobs} | {p50} / {p99} | {drain} | {submit} | {total} | {ratio} | {cpu_ratio} |")
    print("(ranges are min–max over rounds with the median; ratios compare medians: jobs/s above 1 means dispatch "
          "is faster, CPU below 1 means dispatch uses less CPU per job)")


# =============================================================================================
# --big-output
# =============================================================================================


def mode_big_output(args) -> int:
    mb = args.big_output
    print(f"-- big output: one job printing {mb} MB while short jobs arrive at {args.short_rate:g}/s; "
          f"{args.agents} agents")
    with Workspace(args.keep) as ws:
        farm = DispatchFarm(ws, args.agents).start()
        try:
            asyncio.run(farm.warm_up(args.warmup))
            if args.profile:
                Path(args.profile).mkdir(parents=True, exist_ok=True)
                with Profiler(farm.server.pid, Path(args.profile) / "server-big-output"):
                    result = asyncio.run(_big_output(farm, ws, mb, args))
            else:
                result = asyncio.run(_big_output(farm, ws, mb, args))
        finally:
            farm.stop()
    return result


async def _big_output(farm: DispatchFarm, ws: Path, mb: int, args) -> int:
    pid = farm.server.pid
    stamps = ws / "stamps"
    line = "dispatch big output " + "0123456789abcdef" * 4  # 84 characters and a newline
    command = f"yes {shlex.quote(line)} | head -c {mb * 1024 * 1024}"
    rss0 = rss_mb(pid)
    hwm_reset = reset_peak_rss(pid)
    s0 = cpu_seconds(pid)
    submitted: dict[str, float] = {}
    with RssSampler(pid) as sampler:
        async with farm.client(64) as client:
            big = await client.submit(command)
            t_start = time.time()
            tasks, i = [], 0
            deadline = time.monotonic() + args.cap
            while time.monotonic() < deadline:
                with farm.server.db() as db:
                    status = db.execute("SELECT status FROM jobs WHERE id = ?", (big,)).fetchone()[0]
                if status in ("completed", "failed", "cancelled"):
                    break
                tag = f"s{i}"
                i += 1

                async def one(tag=tag) -> None:
                    submitted[tag] = time.time()
                    await client.submit(stamp_command(stamps, tag))

                tasks.append(asyncio.ensure_future(one()))
                await asyncio.sleep(1 / args.short_rate)
            await asyncio.gather(*tasks)
        got = wait_for_stamps(stamps, submitted, 30)
    s1 = cpu_seconds(pid)
    peak = peak_rss_mb(pid) if hwm_reset else sampler.max
    with farm.server.db() as db:
        job = db.execute("SELECT * FROM jobs WHERE id = ?", (big,)).fetchone()
        stored = db.execute("SELECT COALESCE(SUM(length(data)), 0) FROM job_output WHERE job_id = ?",
                            (big,)).fetchone()[0]
    elapsed = (parse_iso(job["completed_at"]) - parse_iso(job["started_at"])) if job["completed_at"] else float("nan")
    lat = latency_summary(submitted, got)
    print(f"big job: {job['status']} exit {job['exit_code']} in {elapsed:.1f} s ({mb / elapsed:.1f} MB/s through "
          f"the server); stdout counted {job['stdout_bytes'] / 2**20:.1f} MB, kept {stored / 2**20:.1f} MB "
          f"(cap {os.environ.get('DISPATCH_MAX_OUTPUT_MB', '10')} MB/stream)")
    print(f"server RSS: before {rss0:.1f} MB, peak {peak:.1f} MB (VmHWM{'' if hwm_reset else ' n/a: sampled'}; "
          f"sampled max {sampler.max:.1f} MB) -> growth {peak - rss0:.1f} MB")
    print(f"server CPU during the run: {s1 - s0:.1f} s over {time.time() - t_start:.1f} s")
    print(f"short jobs while it ran: {fmt_lat(lat)}", flush=True)
    return 0 if job["status"] == "completed" else 1


# =============================================================================================
# --idle-agents
# =============================================================================================


def mode_idle_agents(args) -> int:
    n = args.idle_agents
    print(f"-- idle agents: {n} simulated agents (one asyncio process) long-polling get-job?wait=30 and "
          f"heartbeating every nextCheckIn; ramp {args.ramp:g} s, then {args.duration:g} s measured; "
          f"then {args.herd_jobs} jobs one at a time (the long-poll bell)")
    with Workspace(args.keep) as ws:
        farm = DispatchFarm(ws, 0).start()
        try:
            return asyncio.run(_idle_agents(farm, n, args))
        finally:
            farm.stop()


async def _idle_agents(farm: DispatchFarm, n: int, args) -> int:
    url, pid = farm.server.url, farm.server.pid
    rss_start = rss_mb(pid)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False),
                                    timeout=aiohttp.ClientTimeout(total=90))
    stop = asyncio.Event()
    pickups: list[tuple[float, str]] = []  # (time the job reached a simulated agent, job id)
    errors: list[str] = []
    tokens: list[str] = []
    prefix = uuid.uuid4().hex[:6]

    async def register(i: int) -> None:
        body = {"workerId": f"sim-{prefix}-{i}", "hostname": f"sim-{i}", "cpuCount": 4,
                "metadata": {"osType": "Linux", "tags": []}}
        async with session.post(url + "/api/workers/register", json=body,
                                headers={"Authorization": f"Bearer {REGISTRATION_TOKEN}"}) as resp:
            if resp.status != 201:
                raise RuntimeError(f"register: {resp.status} {await resp.text()}")
            tokens.append((await resp.json())["token"])

    sem = asyncio.Semaphore(32)

    async def limited(i):
        async with sem:
            await register(i)

    t_reg = time.monotonic()
    await asyncio.gather(*(limited(i) for i in range(n)))
    print(f"registered {n} workers in {time.monotonic() - t_reg:.1f} s; server RSS {rss_mb(pid):.1f} MB "
          f"(at start {rss_start:.1f} MB)", flush=True)

    async def heartbeat(token: str, offset: float, worker_id: str) -> None:
        await asyncio.sleep(offset)
        while not stop.is_set():
            try:
                async with session.post(url + "/api/workers/heartbeat", headers={"x-worker-token": token},
                                        json={"workerId": worker_id, "status": "idle", "jobsCompleted": 0}) as resp:
                    body = await resp.json()
                    interval = body["nextCheckIn"] / 1000
            except Exception as err:  # counted, the loop goes on
                errors.append(f"heartbeat: {err!r}")
                interval = 5
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except asyncio.TimeoutError:
                pass

    async def poll(token: str, offset: float) -> None:
        await asyncio.sleep(offset)
        headers = {"x-worker-token": token}
        while not stop.is_set():
            try:
                async with session.get(url + "/api/jobs/get-job?wait=30", headers=headers) as resp:
                    if resp.status == 200:
                        job = (await resp.json())["job"]
                        pickups.append((time.time(), job["jobId"]))
                        async with session.post(url + "/api/jobs/submit-result", headers=headers,
                                                json={"jobId": job["jobId"], "exitCode": 0, "stdout": "",
                                                      "stderr": "", "attempt": job["attempt"]}) as done:
                            await done.read()
                    elif resp.status != 204:
                        errors.append(f"get-job {resp.status}")
                        await asyncio.sleep(1)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                errors.append(f"get-job: {err!r}")
                await asyncio.sleep(1)

    tasks = []
    for i, token in enumerate(tokens):
        offset = random.uniform(0, args.ramp)
        tasks.append(asyncio.ensure_future(poll(token, offset)))
        tasks.append(asyncio.ensure_future(heartbeat(token, random.uniform(0, args.ramp), f"sim-{prefix}-{i}")))
    await asyncio.sleep(args.ramp + 1)
    reset_peak_rss(pid)
    s0, t0, c0 = cpu_seconds(pid), time.monotonic(), time.process_time()
    rss_samples = []
    while time.monotonic() - t0 < args.duration:
        await asyncio.sleep(1)
        rss_samples.append(rss_mb(pid))
    s1, t1, c1 = cpu_seconds(pid), time.monotonic(), time.process_time()
    cpu_pct = (s1 - s0) / (t1 - t0) * 100
    with farm.server.db() as db:
        beats = db.execute("SELECT COUNT(*) FROM workers WHERE last_heartbeat >= ?",
                           (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - (t1 - t0))),)).fetchone()[0]
    print(f"workers that heartbeat during the window: {beats} of {n}")
    print(f"steady state over {t1 - t0:.0f} s: server CPU {cpu_pct:.1f}% of a core; RSS {rss_samples[-1]:.1f} MB "
          f"(max sampled {max(rss_samples):.1f}, VmHWM {peak_rss_mb(pid):.1f}); "
          f"the simulated agents' process used {(c1 - c0) / (t1 - t0) * 100:.1f}%; errors {len(errors)}", flush=True)

    # The bell: each submitted job wakes every parked long-poll.
    herd_lat, herd_cpu = [], []
    if args.herd_jobs:
        async with farm.client(4) as client:
            for _ in range(args.herd_jobs):
                before = len(pickups)
                cpu0 = cpu_seconds(pid)
                t_sub = time.time()
                await client.submit("true")
                deadline = time.monotonic() + 10
                while len(pickups) == before and time.monotonic() < deadline:
                    await asyncio.sleep(0.001)
                if len(pickups) > before:
                    herd_lat.append((pickups[-1][0] - t_sub) * 1000)
                await asyncio.sleep(0.5)
                herd_cpu.append(cpu_seconds(pid) - cpu0)
        idle_cpu = (s1 - s0) / (t1 - t0) * 0.5  # what 0.5 s of idle costs anyway
        per_job = (sum(herd_cpu) / len(herd_cpu) - idle_cpu) * 1000
        print(f"one job at a time with {n} parked polls: submit → get-job answered p50 "
              f"{percentile(herd_lat, 50):.1f} ms, max {max(herd_lat, default=float('nan')):.1f} ms; server CPU "
              f"≈ {per_job:.0f} ms per job (vs ~1-3 ms with a few agents)", flush=True)
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await session.close()
    if errors:
        print("first errors:", errors[:5])
    return 0


# =============================================================================================
# --farm: issue 12's farm size, the server alone with N parked agents
# =============================================================================================

FARM_TARGETS = {"rss_mb": 200.0, "idle_cpu_pct": 10.0, "pickup_p50_ms": 10.0}  # issue 12


def _pending(table: dict, key: str) -> asyncio.Future:
    """The future of `key` in `table`, made by whichever side comes first (a job may reach an
    agent before its submit's answer reaches the bench)."""
    if key not in table:
        table[key] = asyncio.get_running_loop().create_future()
    return table[key]


class SimAgents:
    """One ``bench/_sim_agents.py`` process holding `count` protocol-only agents; its lines
    (registered, status, pickup, done, error) are read into futures and counters."""

    def __init__(self, url: str, count: int, prefix: str, log: Path, pickups: dict, dones: dict,
                 poll_wait: int = POLL_WAIT_SECONDS):
        self.url, self.count, self.prefix, self.log, self.poll_wait = url, count, prefix, log, poll_wait
        self.pickups, self.dones = pickups, dones  # {job id: future}, shared by all the processes
        self.registered: asyncio.Future | None = None
        self.statuses: asyncio.Queue = asyncio.Queue()
        self.errors: list[str] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None

    async def start(self) -> "SimAgents":
        loop = asyncio.get_running_loop()
        self.registered = loop.create_future()
        with open(self.log, "ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, str(BENCH / "_sim_agents.py"), "--url", self.url, "--count", str(self.count),
                "--prefix", self.prefix, "--poll-wait", str(self.poll_wait),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        self._reader = asyncio.ensure_future(self._read())
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    async def _read(self) -> None:
        while line := await self.process.stdout.readline():
            word, _, rest = line.decode().strip().partition(" ")
            if word == "pickup":
                job_id, at = rest.split()
                _pending(self.pickups, job_id).set_result(float(at))
            elif word == "done":
                _pending(self.dones, rest).set_result(time.time())
            elif word == "registered" and not self.registered.done():
                self.registered.set_result(float(rest.split()[1]))
            elif word == "status":
                self.statuses.put_nowait([float(x) for x in rest.split()])
            elif word == "error":
                self.errors.append(rest)
        if not self.registered.done():
            self.registered.set_exception(RuntimeError(f"_sim_agents.py exited:\n{self.log.read_text()[-2000:]}"))

    async def send(self, command: str) -> None:
        self.process.stdin.write(command.encode() + b"\n")
        await self.process.stdin.drain()

    async def status(self) -> list[float]:
        """[polls parked, heartbeats sent, polls sent, connections opened, errors] so far, and a
        heartbeat's round trip p50 and p99 (ms) since the last status."""
        await self.send("status")
        return await asyncio.wait_for(self.statuses.get(), 30)

    async def stop(self) -> None:
        if self.process.returncode is None:
            try:
                await self.send("stop")
                await asyncio.wait_for(self.process.wait(), 15)
            except (OSError, asyncio.TimeoutError):
                self.process.kill()
                await self.process.wait()
        if self._reader:
            await asyncio.gather(self._reader, return_exceptions=True)


def mode_farm(args) -> int:
    n = args.farm
    processes = args.farm_processes or max(1, -(-n // 2500))
    print(f"-- farm size: {n} protocol-only agents in {processes} process(es) of bench/_sim_agents.py (each agent: "
          f"register, heartbeats as agent.py sends them (none while a poll waits and the server says "
          f"pollKeepsAlive), get-job?wait={args.poll_wait} back to back, each on its own kept-alive connection "
          f"as agent.py's threads); the server starts with a soft open-files limit of "
          f"{args.start_nofile} and raises it itself; ramp {args.ramp:g} s + {args.settle:g} s, idle window "
          f"{args.duration:g} s, then {args.probes} jobs one at a time, {args.probe_interval:g} s apart")
    with Workspace(args.keep) as ws:
        gc_log = ws / "gc.log" if args.gc_stats else None
        options = {"script": BENCH / "_dispatch_gc.py", "server_env": {"BENCH_GC_LOG": str(gc_log)}} if gc_log else {}
        farm = DispatchFarm(ws, 0, start_nofile=args.start_nofile, **options).start()
        try:
            return asyncio.run(_farm(farm, ws, n, processes, args, gc_log))
        finally:
            farm.stop()


async def _farm(farm: DispatchFarm, ws: Path, n: int, processes: int, args, gc_log: Path | None) -> int:
    pid = farm.server.pid
    fds0, soft, hard = open_files(pid)
    rss0 = rss_mb(pid)
    print(f"server alone: RSS {rss0:.1f} MB, {fds0} descriptors open; open-files limit soft {soft} / hard {hard} "
          f"(started with soft {args.start_nofile})", flush=True)
    pickups: dict[str, asyncio.Future] = {}
    dones: dict[str, asyncio.Future] = {}
    shares = [n // processes + (1 if k < n % processes else 0) for k in range(processes)]
    sims = [SimAgents(farm.server.url, share, f"sim{k}", ws / f"sim{k}.log", pickups, dones, args.poll_wait)
            for k, share in enumerate(shares)]
    try:
        return await _farm_measure(farm, sims, n, pickups, dones, fds0, args, gc_log)
    finally:
        await asyncio.gather(*(s.stop() for s in sims if s.process), return_exceptions=True)
        errors = [e for s in sims for e in s.errors]
        if errors:
            print("first errors of the simulated agents:", errors[:5])


def _gc_reading(path: Path | None) -> dict | None:
    """The last line bench/_dispatch_gc.py wrote: {time, generations: {gen: [count, seconds]}, long}."""
    try:
        lines = path.read_text().splitlines() if path else []
    except OSError:
        return None
    return json.loads(lines[-1]) if lines else None


async def _farm_measure(farm: DispatchFarm, sims: list[SimAgents], n: int, pickups: dict, dones: dict, fds0: int,
                        args, gc_log: Path | None) -> int:
    pid = farm.server.pid

    async def totals() -> list:
        """The processes' status columns added up, and the worst of their heartbeat p50 and p99."""
        cols = list(zip(*await asyncio.gather(*(s.status() for s in sims))))
        return [int(sum(col)) for col in cols[:5]] + [max(cols[5]), max(cols[6])]

    # 1. register (each process its share, 16 at a time)
    s0, t0 = cpu_seconds(pid), time.monotonic()
    for s in sims:
        await s.start()
    await asyncio.wait_for(asyncio.gather(*(s.registered for s in sims)), max(120.0, n / 20))
    print(f"registered {n} workers in {time.monotonic() - t0:.1f} s (server CPU {cpu_seconds(pid) - s0:.1f} s); "
          f"server RSS {rss_mb(pid):.1f} MB", flush=True)

    # 2. every agent starts at a random moment of the ramp (= the poll's wait by default: the poll
    #    renewals are then spread evenly, as in a farm that runs for a while)
    for s in sims:
        await s.send(f"go {args.ramp}")
    await asyncio.sleep(args.ramp + args.settle)
    deadline = time.monotonic() + 30
    while (parked := (await totals())[0]) < 0.99 * n and time.monotonic() < deadline:
        await asyncio.sleep(1)  # the server may still be catching up with the ramp
    parked, beats, polls, connects, errors, *_ = await totals()
    if parked < 0.99 * n:
        print(f"  ** NOT STEADY: {parked} of {n} polls parked 30 s after the ramp; measuring anyway **")
    fds, soft, hard = open_files(farm.server.pid)
    print(f"steady state: {parked} of {n} polls parked, {beats} heartbeats and {polls} polls sent so far, "
          f"{connects} connections opened, {errors} errors; server {fds} descriptors open", flush=True)

    # 3. the idle window: the server's CPU (/proc), RSS and descriptors sampled every second
    profiler = None
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        profiler = Profiler(pid, Path(args.profile) / "server-farm-idle")
        profiler.__enter__()
    reset_peak_rss(pid)
    gc0 = _gc_reading(gc_log)
    sim_pids = [s.pid for s in sims]
    t0, s0, c0 = time.monotonic(), cpu_seconds(pid), tree_cpu_seconds(sim_pids)
    rss, fd_counts = [], []
    while time.monotonic() - t0 < args.duration:
        await asyncio.sleep(1)
        rss.append(rss_mb(pid))
        fd_counts.append(open_files(pid)[0])
    t1, s1, c1 = time.monotonic(), cpu_seconds(pid), tree_cpu_seconds(sim_pids)
    if profiler:
        profiler.__exit__(None, None, None)
    _, beats1, polls1, connects1, errors1, beat_p50, beat_p99 = await totals()
    window = t1 - t0
    idle_pct = (s1 - s0) / window * 100
    hwm = peak_rss_mb(pid)
    print(f"idle window {window:.0f} s: server CPU {idle_pct:.1f}% of a core ({(s1 - s0) * 1000 / window:.0f} ms/s); "
          f"RSS {rss[-1]:.1f} MB (max sampled {max(rss):.1f}, VmHWM {hwm:.1f}); descriptors {max(fd_counts)} at most; "
          f"the server saw {(beats1 - beats) / window:.0f} heartbeats/s, {(polls1 - polls) / window:.0f} get-job "
          f"renewals/s, {(connects1 - connects) / window:.0f} new connections/s; a heartbeat answered in p50 "
          f"{beat_p50:.1f} / p99 {beat_p99:.1f} ms; the simulated agents' processes "
          f"used {(c1 - c0) / window * 100:.1f}% of a core; errors {errors1 - errors}", flush=True)
    gc1 = _gc_reading(gc_log)
    if gc0 and gc1:
        spent = {g: [gc1["generations"][g][i] - gc0["generations"][g][i] for i in (0, 1)] for g in ("0", "1", "2")}
        pauses = [p for p in gc1["long"] if gc0["time"] <= p[0] <= gc1["time"]]
        longest = max(pauses, key=lambda p: p[2], default=None)
        span = gc1["time"] - gc0["time"]
        print(f"server GC in the window ({span:.0f} s): " + ", ".join(
            f"gen{g} {c} in {t * 1000:.0f} ms" for g, (c, t) in spent.items()) +
            f" = {sum(t for _, t in spent.values()) / span * 100:.1f}% of a core; {len(pauses)} collections of "
            f"≥ 10 ms" + (f", the longest {longest[2] * 1000:.0f} ms (gen{longest[1]})" if longest else "") +
            (f"; gc thresholds {os.environ['BENCH_GC_THRESHOLD']} (BENCH_GC_THRESHOLD)"
             if os.environ.get("BENCH_GC_THRESHOLD") else ""), flush=True)
    if profiler:
        print(f"profile (py-spy, the idle window; its own sampling adds CPU): {args.profile}/server-farm-idle.svg;"
              f" summarise with: python bench/profile_summary.py {args.profile}/server-farm-idle.txt", flush=True)

    # 4. pickup: one job at a time; the time the get-job answer with it was read in a simulated agent
    #    (the server may hand the job out before it answers the submit: "from the 201" can be negative)
    after_201, after_start, round_trips = [], [], []
    missing = 0
    profiler = Profiler(pid, Path(args.profile) / "server-farm-pickup") if args.profile else None
    if profiler:
        profiler.__enter__()
    s2, t2 = cpu_seconds(pid), time.monotonic()
    async with farm.client(4) as client:
        for _ in range(args.probes):
            if time.monotonic() - t2 > args.cap or missing >= 3:
                print(f"  (pickups cut short: {'3 jobs not picked up within 10 s' if missing >= 3 else '--cap'})")
                break
            t_start = time.time()
            job_id = await client.submit("true")
            t_201 = time.time()
            try:
                picked = await asyncio.wait_for(asyncio.shield(_pending(pickups, job_id)), 10)
                await asyncio.wait_for(asyncio.shield(_pending(dones, job_id)), 10)
            except asyncio.TimeoutError:
                missing += 1
                continue
            after_201.append((picked - t_201) * 1000)
            after_start.append((picked - t_start) * 1000)
            round_trips.append((t_201 - t_start) * 1000)
            await asyncio.sleep(args.probe_interval)
    s3, t3 = cpu_seconds(pid), time.monotonic()
    if profiler:
        profiler.__exit__(None, None, None)
    per_job = ((s3 - s2) - (s1 - s0) / window * (t3 - t2)) / max(len(after_201) + missing, 1) * 1000
    print(f"one job at a time with {n} parked polls ({len(after_201)} jobs{f', {missing} MISSING' if missing else ''}):"
          f" submit's start → job read by an agent p50 {percentile(after_start, 50):.1f} ms, p99 "
          f"{percentile(after_start, 99):.1f} ms, max {max(after_start, default=float('nan')):.1f} ms; from the "
          f"submit's 201 p50 {percentile(after_201, 50):.1f} / p99 {percentile(after_201, 99):.1f} ms (the submit's "
          f"round trip p50 {percentile(round_trips, 50):.1f} / p99 {percentile(round_trips, 99):.1f} ms); server CPU "
          f"≈ {per_job:.1f} ms per job beyond idle", flush=True)
    if profiler:
        print(f"profile (py-spy, the pickups): {args.profile}/server-farm-pickup.svg", flush=True)

    # 5. descriptors: what the OS limit must be
    fds_max, soft, hard = max(fd_counts), *open_files(pid)[1:]
    worst = fds0 + 2 * n
    print(f"descriptors: {fds0} with no agent, {fds_max} with {n} agents parked (≈ {(fds_max - fds0) / n:.2f} per "
          f"agent: its poll, and its heartbeat connection until the 15 s keep-alive closes it); up to 2 per agent "
          f"(+1 per extra job slot) if every heartbeat connection is open at once: {worst} → the hard limit "
          f"(`ulimit -Hn`, systemd LimitNOFILE=) must be ≥ {worst} for {n} agents; the server raised its soft "
          f"limit from {args.start_nofile} to {soft} (hard {hard})"
          f"{'' if soft >= worst else '  ** BELOW WHAT THIS FARM MAY NEED **'}", flush=True)
    checks = [("RSS", max(rss), FARM_TARGETS["rss_mb"], "MB"),
              ("idle CPU", idle_pct, FARM_TARGETS["idle_cpu_pct"], "%"),
              ("pickup p50", percentile(after_start, 50) if not missing else float("inf"),
               FARM_TARGETS["pickup_p50_ms"], "ms")]
    print("issue 12 targets at this size: " + "; ".join(
        f"{name} {value:.1f} {unit} {'≤' if value <= limit else '>'} {limit:g} {unit}: "
        f"{'met' if value <= limit else 'MISSED'}" for name, value, limit, unit in checks), flush=True)
    return 0 if not missing and farm.server.process.poll() is None else 1


# =============================================================================================
# --upload
# =============================================================================================


def mode_upload(args) -> int:
    mb = args.upload
    print(f"-- upload: one {mb} MB multipart upload (streamed from a 1 MiB buffer, never whole in memory), "
          f"{args.runs} run(s), stored in {'PostgreSQL' if args.postgres else 'the data dir'}")
    with Workspace(args.keep) as ws, (PostgresDatabase(args.postgres) if args.postgres
                                      else contextlib.nullcontext()) as database:
        env = {"DISPATCH_MAX_UPLOAD_MB": str(max(500, mb + 1))}
        if database:
            env["DISPATCH_DATABASE_URL"] = database.url
        farm = DispatchFarm(ws, 0, server_env=env).start()
        try:
            for run in range(args.runs):
                _upload_once(farm, mb, run)
        finally:
            farm.stop()
    return 0


def _upload_once(farm: DispatchFarm, mb: int, run: int) -> None:
    pid = farm.server.pid
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    chunk = os.urandom(1024 * 1024)
    size = mb * len(chunk)
    rss0 = rss_mb(pid)
    hwm = reset_peak_rss(pid)
    s0, c0 = cpu_seconds(pid), time.process_time()
    with RssSampler(pid) as sampler:
        t0 = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", farm.server.port, timeout=300)
        conn.putrequest("POST", "/api/files/upload")
        conn.putheader("Authorization", f"Bearer {farm.token}")
        conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        conn.putheader("Content-Length", str(len(head) + size + len(tail)))
        conn.endheaders()
        conn.send(head)
        for _ in range(mb):
            conn.send(chunk)
        conn.send(tail)
        resp = conn.getresponse()
        body = json.loads(resp.read())
        elapsed = time.monotonic() - t0
        conn.close()
    s1, c1 = cpu_seconds(pid), time.process_time()
    peak = peak_rss_mb(pid) if hwm else sampler.max
    ok = resp.status == 201 and body.get("size") == size
    print(f"run {run + 1}: {resp.status} {'ok' if ok else body}; {mb} MB in {elapsed:.2f} s = {mb / elapsed:.0f} MB/s; "
          f"server RSS before {rss0:.1f} MB, peak {peak:.1f} MB (sampled max {sampler.max:.1f}) -> growth "
          f"{peak - rss0:.1f} MB; server CPU {s1 - s0:.2f} s ({(s1 - s0) / mb * 1000:.1f} ms/MB), client CPU "
          f"{c1 - c0:.2f} s", flush=True)
    if ok:  # keep the disk free for the next run (a PostgreSQL database is dropped at the end)
        for path in (farm.server.data_dir / "uploads" / body["fileId"]).glob("*"):
            path.unlink()


# =============================================================================================
# main
# =============================================================================================


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=2000, help="jobs per throughput drain (default 2000)")
    p.add_argument("--agents", type=int, default=4, help="agents (or peer workers) (default 4)")
    p.add_argument("--runs", type=int, default=1, help="repeat the measurement (fresh processes each time)")
    p.add_argument("--warmup", type=int, default=20, help="jobs run before measuring (default 20)")
    p.add_argument("--submit-concurrency", type=int, default=8, help="concurrent submits in the preload")
    p.add_argument("--cap", type=float, default=100.0, help="seconds a drain may take before it is cut short")
    p.add_argument("--profile", metavar="DIR", help="py-spy the server and two agents during the first drain")
    p.add_argument("--keep", action="store_true", help="keep the temp dirs (logs, databases)")
    p.add_argument("--sim-agents", action="store_true",
                   help="throughput with protocol-only agents inside the bench (the server's own ceiling)")
    p.add_argument("--sim-exec", action="store_true", help="with --sim-agents: each job still runs `true`")
    p.add_argument("--sim-delay", type=float, default=0.0, help="with --sim-agents: seconds each job 'runs'")
    p.add_argument("--sim-no-keepalive", action="store_true",
                   help="with --sim-agents: a new connection per request, as agent.py's urllib does")
    modes = p.add_argument_group("modes (default: throughput)")
    modes.add_argument("--latency", action="store_true", help="pickup latency: idle probe, then 10/50/80%% pace")
    modes.add_argument("--peers", action="store_true", help="the same jobs through Celery and RQ on Redis")
    modes.add_argument("--big-output", type=int, metavar="MB", nargs="?", const=100, help="one job printing MB")
    modes.add_argument("--idle-agents", type=int, metavar="N", nargs="?", const=1000, help="N long-polling agents")
    modes.add_argument("--upload", type=int, metavar="MB", nargs="?", const=500, help="one upload of MB")
    modes.add_argument("--servers", type=int, default=1, help="throughput and --latency: servers on the "
                       "--postgres database (submits to the first, agents on the last)")
    modes.add_argument("--postgres", metavar="URL", help="throughput, --latency, --upload: the server(s) on PostgreSQL, in a database of "
                                                         "the run's own made through URL and dropped at the end")
    modes.add_argument("--farm", type=int, metavar="N", nargs="?", const=5000,
                       help="farm size (issue 12): N parked protocol-only agents in separate processes; server RSS, "
                            "idle CPU, descriptors, one job's pickup (--probes, --probe-interval)")
    lat = p.add_argument_group("latency, peers and big-output options")
    lat.add_argument("--rate", type=float, help="jobs/s that 100%% pace means (default: measured first)")
    lat.add_argument("--latency-jobs", type=int, default=1000, help="jobs of the throughput run that sets the pace")
    lat.add_argument("--phase-seconds", type=float, default=5.0, help="seconds per paced phase")
    lat.add_argument("--probes", type=int, default=50, help="idle probe jobs")
    lat.add_argument("--probe-interval", type=float, default=0.2, help="seconds between idle probes")
    lat.add_argument("--durability", choices=["normal", "full"], default="normal",
                     help="peers: normal = Redis no persistence vs SQLite NORMAL; full = AOF always vs SQLite FULL")
    lat.add_argument("--peer-systems", help="comma list of dispatch,celery,rq,rq-simple (default all)")
    lat.add_argument("--short-rate", type=float, default=20.0, help="big-output: short jobs per second")
    idle = p.add_argument_group("idle-agents options")
    idle.add_argument("--ramp", type=float, help="seconds over which the agents start polling (default 10; "
                                                   "--farm: --poll-wait, so that poll renewals are spread evenly)")
    idle.add_argument("--duration", type=float, default=30.0, help="seconds measured")
    idle.add_argument("--herd-jobs", type=int, default=10, help="jobs submitted one at a time afterwards")
    idle.add_argument("--settle", type=float, default=5.0, help="--farm: seconds after the ramp before measuring")
    idle.add_argument("--farm-processes", type=int, help="--farm: simulated agents' processes (default N/2500)")
    idle.add_argument("--gc-stats", action="store_true",
                      help="--farm: run the server through bench/_dispatch_gc.py and report its garbage collections"
                           " in the idle window (BENCH_GC_THRESHOLD=a,b,c: gc.set_threshold first)")
    idle.add_argument("--poll-wait", type=int, default=POLL_WAIT_SECONDS,
                      help=f"--farm: the simulated agents' get-job wait (agent.py's: {POLL_WAIT_SECONDS}; a what-if)")
    idle.add_argument("--start-nofile", type=int, default=1024,
                      help="--farm: the soft open-files limit the server starts with (default 1024)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.ramp is None:
        args.ramp = float(args.poll_wait) if args.farm else 10.0
    if not sys.platform.startswith("linux"):
        print("the bench reads /proc: Linux only")
        return 2
    print_banner("dispatch bench")
    started = time.monotonic()
    status = 0
    ran = False
    for flag, mode in (("latency", mode_latency), ("peers", mode_peers), ("big_output", mode_big_output),
                       ("idle_agents", mode_idle_agents), ("upload", mode_upload), ("farm", mode_farm)):
        value = getattr(args, flag)
        if value:
            ran = True
            status |= mode(args)
    if not ran:
        status |= mode_throughput(args)
    print(f"(bench took {time.monotonic() - started:.0f} s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
