#!/usr/bin/env python3
"""What a request costs the server when it comes alone, against the same request in a burst.

An idle farm's requests (poll renewals) each arrive on a quiet server: it wakes, handles one, and
sleeps again, with cold caches each time. A real ``python dispatch.py``, one registered worker,
and the same empty ``get-job?wait=0`` sent by one client for a few seconds at each pace:

  back to back       the next request as soon as the answer is read
  alone, every N ms  one request, then a pause
  K at once          K requests together (K connections), then a pause

Prints the server's CPU (user + system, /proc) per request. The long polls of dispatch end on a
whole second of its clock for this reason (``_poll_deadline``): a farm's renewals come in bursts.

    python bench/lone_requests.py [--seconds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REGISTRATION_TOKEN, DispatchServer, Workspace, cpu_seconds, print_banner  # noqa: E402

PACES = [("back to back", 0.0, 1), ("alone, every 10 ms", 0.01, 1), ("alone, every 50 ms", 0.05, 1),
         ("5 at once, every 50 ms", 0.05, 5), ("50 at once, every 500 ms", 0.5, 50)]


async def measure(url: str, server_pid: int, seconds: float) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/api/workers/register", json={"workerId": "bench-1", "hostname": "bench"},
                                headers={"Authorization": f"Bearer {REGISTRATION_TOKEN}"}) as response:
            headers = {"x-worker-token": (await response.json())["token"]}

        async def one() -> None:
            async with session.get(url + "/api/jobs/get-job?wait=0", headers=headers) as response:
                assert response.status == 204, response.status
                await response.read()

        for label, pause, burst in PACES:
            sent, cpu, started = 0, cpu_seconds(server_pid), time.monotonic()
            while time.monotonic() - started < seconds:
                await asyncio.gather(*(one() for _ in range(burst)))
                sent += burst
                if pause:
                    await asyncio.sleep(pause)
            each = (cpu_seconds(server_pid) - cpu) / sent * 1000
            print(f"{label:>26}: {sent:6d} requests, server CPU {each:.3f} ms each")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds at each pace")
    args = parser.parse_args()
    print_banner("lone requests against bursts: the server's CPU per request")
    with Workspace() as work:
        server = DispatchServer(work).start()
        try:
            asyncio.run(measure(server.url, server.pid, args.seconds))
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
