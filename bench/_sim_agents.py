#!/usr/bin/env python3
"""Protocol-only agents for ``bench/throughput.py --farm``: N simulated agents in one process,
each doing on the wire what an idle ``agent.py --concurrency 1`` does, and nothing else.

Per agent, as agent.py's _ServerLink and job slot do it:
- register (``POST /api/workers/register``, the registration token, agent.py's body);
- two kept-alive HTTP/1.1 connections, like agent.py's one http.client connection per thread:
  one for heartbeats, one for the job slot (get-job and submit-result). The server closes an idle
  connection after its keep-alive timeout (15 s, the heartbeat interval is 30 s), so a heartbeat
  usually opens a new one, as agent.py's does;
- a heartbeat at once, then every ``nextCheckIn`` (clamped to 1..300 s), agent.py's body
  (state, status, runningJobs, run, polled, offers), skipped while the server said
  ``pollKeepsAlive``, a poll waits and no job is held, as agent.py's;
- ``GET /api/jobs/get-job?wait=50&run=R&poll=K`` back to back (``--poll-wait``: a what-if of
  another wait); a job is "run" at once (exit 0,
  no output) and its result sent with ``POST /api/jobs/submit-result`` before the next poll.

A minimal HTTP/1.1 client on asyncio streams rather than aiohttp: aiohttp's pool would share
kept-alive connections among the simulated agents, so the server would hold fewer sockets than
the same number of real agents make it hold, and it costs more CPU per request.

Run by the bench, one process per share of the farm; it talks to the bench by lines.
stdin:  ``go <ramp seconds>`` (start the agents, each at a random moment of the ramp), ``status``,
        ``stop``.
stdout: ``registered <n> <seconds>``, ``status <parked> <heartbeats> <polls> <connects> <errors> <p50> <p99>``
        (polls parked now; heartbeats, polls sent, connections opened and errors so far; a heartbeat's
        round trip in ms, p50 and p99 since the last ``status``),
        ``pickup <job id> <epoch seconds>`` (the get-job answer with a job was read),
        ``done <job id>`` (its submit-result answered), ``error <text>`` (the first few), ``bye``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import urllib.parse
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REGISTRATION_TOKEN, _raise_nofile  # noqa: E402

POLL_WAIT_SECONDS = 50  # agent.py's POLL_WAIT_SECONDS
HTTP_TIMEOUT_SECONDS = 15  # agent.py's HTTP_TIMEOUT_SECONDS


class Link:
    """One kept-alive HTTP/1.1 connection (Content-Length bodies only, as dispatch answers JSON),
    reopened when the server has closed it."""

    def __init__(self, host: str, port: int, stats: dict):
        self.host, self.port, self.stats = host, port, stats
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, method: str, target: str, headers: dict, body=None,
                      timeout: float = HTTP_TIMEOUT_SECONDS) -> tuple[int, dict | None]:
        data = b"" if body is None else json.dumps(body).encode()
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host}:{self.port}", "Accept-Encoding: identity",
                 *(f"{k}: {v}" for k, v in headers.items())]
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + data
        for attempt in (0, 1):
            if self.reader is not None and self.reader.at_eof():
                self.close()  # the server's keep-alive timeout closed it
            reused = self.writer is not None
            try:
                if self.writer is None:
                    self.reader, self.writer = await asyncio.wait_for(
                        asyncio.open_connection(self.host, self.port), HTTP_TIMEOUT_SECONDS)
                    self.stats["connects"] += 1
                self.writer.write(raw)
                return await asyncio.wait_for(self._answer(), timeout)
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if reused and attempt == 0:
                    continue  # closed under us between two requests: once more, as agent.py does
                raise
            except BaseException:
                self.close()
                raise
        raise AssertionError("unreachable")

    async def _answer(self) -> tuple[int, dict | None]:
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status, length, close = int(head[0].split()[1]), 0, False
        for line in head[1:]:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                raise RuntimeError(f"a {value} answer: this client reads Content-Length bodies only")
            elif name == "connection" and value == "close":
                close = True
        raw = await self.reader.readexactly(length) if length else b""
        if close:
            self.close()
        return status, json.loads(raw) if raw else None


class Farm:
    def __init__(self, url: str, count: int, prefix: str, poll_wait: int = POLL_WAIT_SECONDS):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.count, self.prefix, self.poll_wait = count, prefix, poll_wait
        self.stats = {"parked": 0, "heartbeats": 0, "polls": 0, "connects": 0, "errors": 0}
        self.tokens: list[str] = []
        self.beat_ms: list[float] = []  # heartbeat round trips since the last status
        self.stop = asyncio.Event()

    def say(self, *words) -> None:
        sys.stdout.write(" ".join(str(w) for w in words) + "\n")
        sys.stdout.flush()

    def error(self, what: str, err) -> None:
        if self.stop.is_set():
            return  # stopping: connections are being closed under the requests
        self.stats["errors"] += 1
        if self.stats["errors"] <= 5:
            self.say("error", f"{what}: {err!r}"[:300].replace("\n", " "))

    def link(self) -> Link:
        return Link(self.host, self.port, self.stats)

    async def register(self, concurrency: int = 16) -> None:
        """Register every agent (agent.py's body), `concurrency` at a time, each over its own connection."""
        self.tokens = [""] * self.count
        todo = iter(range(self.count))

        async def worker() -> None:
            link = self.link()
            for i in todo:
                body = {"workerId": f"{self.prefix}-{i}", "hostname": f"{self.prefix}-{i}", "cpuCount": 4,
                        "totalMemoryMb": 8192, "cpus": 4, "memoryMb": 6553, "gpus": 0,
                        "metadata": {"osType": "Linux", "pythonVersion": "3.11.7", "tags": []}}
                status, answer = await link.request("POST", "/api/workers/register",
                                                    {"Authorization": f"Bearer {REGISTRATION_TOKEN}"}, body)
                if status != 201:
                    raise RuntimeError(f"register answered {status}: {answer}")
                self.tokens[i] = answer["token"]
            link.close()

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def agent(self, i: int, start: float) -> None:
        worker_id, headers = f"{self.prefix}-{i}", {"x-worker-token": self.tokens[i]}
        run = uuid.uuid4().hex
        beat_link, slot_link = self.link(), self.link()
        state = {"sent": 0, "open": set(), "held": [], "completed": 0}
        announced = asyncio.Event()

        def beat_body() -> dict:
            polled = min(state["open"]) - 1 if state["open"] else state["sent"]
            return {"state": "available", "pausedReason": None, "workerId": worker_id,
                    "status": "busy" if state["held"] else "idle", "currentJobId": (state["held"] or [None])[0],
                    "jobsCompleted": state["completed"], "runningJobs": list(state["held"]), "run": run,
                    "polled": polled, "cpus": 4, "memoryMb": 6553, "gpus": 0}

        async def heartbeats() -> None:
            interval, kept_alive = 30.0, False
            while not self.stop.is_set():
                delay = interval
                if not (kept_alive and state["open"] and not state["held"]):  # agent.py's _quiet()
                    try:
                        sent = time.monotonic()
                        status, answer = await beat_link.request("POST", "/api/workers/heartbeat", headers,
                                                                 beat_body())
                        self.beat_ms.append((time.monotonic() - sent) * 1000)
                        if status != 200:
                            raise RuntimeError(f"heartbeat answered {status}: {answer}")
                        self.stats["heartbeats"] += 1
                        interval = delay = min(max(float(answer["nextCheckIn"]) / 1000, 1.0), 300.0)
                        kept_alive = answer.get("pollKeepsAlive") is True
                        announced.set()
                    except asyncio.CancelledError:
                        raise
                    except Exception as err:
                        self.error("heartbeat", err)
                        delay = min(interval, 5.0)
                try:
                    await asyncio.wait_for(self.stop.wait(), delay)
                except asyncio.TimeoutError:
                    pass

        await asyncio.sleep(max(0.0, start - time.monotonic()))
        beating = asyncio.ensure_future(heartbeats())
        try:
            await announced.wait()  # agent.py: a heartbeat of this run before the first get-job
            while not self.stop.is_set():
                state["sent"] += 1
                poll = state["sent"]
                state["open"].add(poll)
                self.stats["parked"] += 1
                self.stats["polls"] += 1
                try:
                    status, answer = await slot_link.request(
                        "GET", f"/api/jobs/get-job?wait={self.poll_wait}&run={run}&poll={poll}", headers,
                        timeout=self.poll_wait + HTTP_TIMEOUT_SECONDS)
                    job = answer["job"] if status == 200 and answer else None
                    if job is not None:
                        self.say("pickup", job["jobId"], f"{time.time():.6f}")
                        state["held"].append(job["jobId"])
                except asyncio.CancelledError:
                    raise
                except Exception as err:
                    self.error("get-job", err)
                    await asyncio.sleep(1)
                    continue
                finally:
                    self.stats["parked"] -= 1
                    state["open"].discard(poll)
                if status != 200 and status != 204:
                    self.error("get-job", f"answered {status}: {answer}")
                    await asyncio.sleep(1)
                if job is None:
                    continue
                body = {"jobId": job["jobId"], "workerId": worker_id, "exitCode": 0, "stdout": "", "stderr": "",
                        "attempt": job["attempt"], "runningFor": 0.0}
                try:
                    status, answer = await slot_link.request("POST", "/api/jobs/submit-result", headers, body)
                    if status != 200:
                        raise RuntimeError(f"submit-result answered {status}: {answer}")
                    state["completed"] += 1
                except asyncio.CancelledError:
                    raise
                except Exception as err:
                    self.error("submit-result", err)
                state["held"].remove(job["jobId"])
                self.say("done", job["jobId"])
        finally:
            beating.cancel()
            await asyncio.gather(beating, return_exceptions=True)
            beat_link.close()
            slot_link.close()

    async def main(self) -> None:
        t0 = time.monotonic()
        await self.register()
        self.say("registered", self.count, f"{time.monotonic() - t0:.2f}")
        loop = asyncio.get_running_loop()
        commands = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
        agents: list[asyncio.Future] = []
        while True:
            words = (await commands.readline()).decode().split()
            if not words or words[0] == "stop":
                break
            if words[0] == "go" and not agents:
                now, ramp = time.monotonic(), float(words[1])
                agents = [asyncio.ensure_future(self.agent(i, now + random.uniform(0, ramp)))
                          for i in range(self.count)]
            elif words[0] == "status":
                s, beats = self.stats, sorted(self.beat_ms) or [float("nan")]
                self.beat_ms = []
                self.say("status", s["parked"], s["heartbeats"], s["polls"], s["connects"], s["errors"],
                         f"{beats[len(beats) // 2]:.1f}", f"{beats[min(len(beats) - 1, len(beats) * 99 // 100)]:.1f}")
        self.stop.set()
        for task in agents:
            task.cancel()
        await asyncio.gather(*agents, return_exceptions=True)
        self.say("bye")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--prefix", default=f"sim-{os.getpid()}")
    p.add_argument("--poll-wait", type=int, default=POLL_WAIT_SECONDS, help="get-job's wait (agent.py: 50)")
    args = p.parse_args()
    _raise_nofile(2 * args.count + 256)  # two connections per agent
    asyncio.run(Farm(args.url, args.count, args.prefix, args.poll_wait).main())
    return 0


if __name__ == "__main__":
    sys.exit(main())
