"""The WebSocket of job events: what it sends and in which order, narrowing to one job, who may
connect, that a client that never reads slows nobody else and costs a bounded backlog, and that
a socket closes when its access ends (logout, revoked token, deleted user)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import time

import aiohttp
import pytest

import dispatch
from conftest import ADMIN_EMAIL, ADMIN_PASSWORD, REGISTRATION_TOKEN, Api

STREAM = "/api/jobs/stream"



async def connect(api: Api, token: str | None, path: str = STREAM, **headers: str):
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return await api.client.ws_connect(path, headers=headers)


async def next_event(ws, timeout: float = 2.0) -> dict:
    message = await asyncio.wait_for(ws.receive(), timeout)
    assert message.type == aiohttp.WSMsgType.TEXT, message
    return json.loads(message.data)


async def events_until(ws, done, timeout: float = 5.0) -> list[dict]:
    """Events until ``done(event)`` is true for one of them (that one included)."""
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    while not events or not done(events[-1]):
        events.append(await next_event(ws, max(0.01, deadline - time.monotonic())))
    return events


def job_events(events: list[dict]) -> list[dict]:
    """The job events of a stream that also tells what the workers look like."""
    return [e for e in events if e["type"].startswith("job.")]


async def collect_output(ws, received: list, count: int) -> None:
    """Append the stream's job.output events to ``received`` until it holds ``count``."""
    while len(received) < count:
        event = await next_event(ws, timeout=5)
        if event["type"] == "job.output":
            received.append(event)


async def no_event_within(ws, seconds: float) -> bool:
    try:
        message = await asyncio.wait_for(ws.receive(), seconds)
    except asyncio.TimeoutError:
        return True
    raise AssertionError(f"unexpected message: {message}")


async def stream_output(api: Api, worker: str, job_id: str, data: str) -> int:
    """Post a chunk of output as a stream, as a large one must go (aiohttp warns of big bytes bodies)."""
    body = io.BytesIO(json.dumps({"jobId": job_id, "data": data, "type": "stdout"}).encode())
    response = await api.call("POST", "/api/jobs/stream-output", worker=worker, data=body,
                              headers={"Content-Type": "application/json"})
    return response.status


async def run_job(api: Api, admin: str, worker: str, job_id: str, lines: list[str], exit_code: int = 0) -> None:
    for line in lines:
        response = await api.call("POST", "/api/jobs/stream-output", worker=worker,
                                  json={"jobId": job_id, "data": line, "type": "stdout"})
        assert response.status == 200
    response = await api.call("POST", "/api/jobs/submit-result", worker=worker,
                              json={"jobId": job_id, "exitCode": exit_code})
    assert response.status == 200


# -- what it sends --------------------------------------------------------------


async def test_a_job_run_through_the_api_is_announced_in_order(api):
    admin = await api.admin()
    worker = await api.register()
    ws = await connect(api, admin)

    job_id = await api.submit(admin, "npm test")
    assert (await api.claim(worker))["jobId"] == job_id
    await run_job(api, admin, worker, job_id, ["test line 1\n", "test line 2\n"])
    events = job_events(await events_until(ws, lambda e: e["type"] == "job.completed"))

    assert [e["type"] for e in events] == ["job.queued", "job.started", "job.output", "job.output", "job.completed"]
    assert {e["jobId"] for e in events} == {job_id}
    assert [e["data"] for e in events if e["type"] == "job.output"] == ["test line 1\n", "test line 2\n"]
    assert events[-1]["exitCode"] == 0
    await ws.close()


async def test_a_failed_job_is_announced_with_its_exit_code(api):
    admin = await api.admin()
    worker = await api.register()
    ws = await connect(api, admin)

    job_id = await api.submit(admin, "false")
    await api.claim(worker)
    await run_job(api, admin, worker, job_id, [], exit_code=3)
    events = job_events(await events_until(ws, lambda e: e["type"] == "job.completed"))

    assert [e["type"] for e in events] == ["job.queued", "job.started", "job.completed"]
    assert (events[-1]["jobId"], events[-1]["exitCode"]) == (job_id, 3)
    await ws.close()


async def test_the_result_output_is_announced_before_the_completion(api):
    admin = await api.admin()
    worker = await api.register()
    job_id = await api.submit(admin, "make")
    await api.claim(worker)
    ws = await connect(api, admin)

    await api.call("POST", "/api/jobs/submit-result", worker=worker,
                   json={"jobId": job_id, "exitCode": 0, "stdout": "built\n"})
    events = await events_until(ws, lambda e: e["type"] == "job.completed")

    assert [(e["type"], e.get("data")) for e in events] == [("job.output", "built\n"), ("job.completed", None)]
    await ws.close()


async def test_job_id_narrows_the_stream_to_one_job(api):
    admin = await api.admin()
    worker = await api.register()
    watched = await api.submit(admin, "watched")
    other = await api.submit(admin, "other")
    narrow = await connect(api, admin, f"{STREAM}?jobId={watched}")
    everything = await connect(api, admin)

    for _ in range(2):
        await api.claim(worker)
    await run_job(api, admin, worker, other, ["other output\n"])
    await run_job(api, admin, worker, watched, ["watched output\n"])
    late = await api.submit(admin, "late")  # after the watched job finished

    narrow_events = await events_until(narrow, lambda e: e["type"] == "job.completed")
    all_events = await events_until(everything, lambda e: e.get("jobId") == late)

    assert {e["jobId"] for e in narrow_events} == {watched}  # and no worker events
    assert [e["type"] for e in narrow_events] == ["job.started", "job.output", "job.completed"]
    assert {e["jobId"] for e in all_events if e["type"].startswith("job.")} == {watched, other, late}
    assert await no_event_within(narrow, 0.2)
    await narrow.close()
    await everything.close()


# -- who may connect ------------------------------------------------------------


async def test_the_auth_cookie_from_the_same_origin_may_connect(api):
    admin = await api.admin()  # leaves the cookie in the jar

    ws = await connect(api, None, Origin=f"http://{api.client.host}:{api.client.port}")
    job_id = await api.submit(admin)

    assert (await next_event(ws))["jobId"] == job_id
    await ws.close()


@pytest.mark.parametrize("credentials, expected", [
    (None, 401), ("not-a-jwt", 401), ("REGISTRATION", 401), ("WORKER", 403)])
async def test_an_upgrade_without_user_credentials_is_refused(api, credentials, expected):
    worker = await api.register()
    api.forget_cookies()
    headers = {}
    if credentials == "WORKER":
        headers["x-worker-token"] = worker
    elif credentials == "REGISTRATION":
        headers["Authorization"] = f"Bearer {REGISTRATION_TOKEN}"
    elif credentials:
        headers["Authorization"] = f"Bearer {credentials}"

    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await api.client.ws_connect(STREAM, headers=headers)

    assert refused.value.status == expected


@pytest.mark.parametrize("via", ["bearer", "cookie"])
async def test_a_foreign_origin_is_refused(api, via):
    admin = await api.admin()
    if via == "bearer":
        api.forget_cookies()
    token = admin if via == "bearer" else None

    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await connect(api, token, Origin="http://evil.example")

    assert refused.value.status == 403


# -- a client that never reads --------------------------------------------------


async def open_silent_client(api: Api, token: str):
    """A WebSocket client that completes the handshake and then never reads a byte, with a tiny
    receive buffer so the server's sends back up quickly."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (api.client.host, api.client.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**16)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET {STREAM} HTTP/1.1\r\nHost: {api.client.host}:{api.client.port}\r\n"
                  f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n").encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    return writer


@pytest.mark.slow  # waits out real time (a long poll, a timeout, an interval)
async def test_a_client_that_never_reads_blocks_neither_other_clients_nor_the_api(api):
    admin = await api.admin()
    worker = await api.register()
    job_id = await api.submit(admin, "chatty")
    await api.claim(worker)
    silent = await open_silent_client(api, admin)
    listener = await connect(api, admin)
    chunk = "x" * (32 * 1024)
    count = 300  # ~10 MB: far more than the silent client's socket buffers hold

    received: list[dict] = []

    listening = asyncio.ensure_future(collect_output(listener, received, count))
    started = time.monotonic()
    slowest = 0.0
    try:
        for n in range(count):
            sent = time.monotonic()
            response = await asyncio.wait_for(
                api.call("POST", "/api/jobs/stream-output", worker=worker,
                         json={"jobId": job_id, "data": f"{n:05d}" + chunk, "type": "stdout"}), 5)
            assert response.status == 200
            slowest = max(slowest, time.monotonic() - sent)
        await asyncio.wait_for(listening, 10)
        health = await asyncio.wait_for(api.call("GET", "/api/health"), 2)
    finally:
        listening.cancel()
        silent.close()
        await listener.close()

    assert health.status == 200
    assert [int(e["data"][:5]) for e in received] == list(range(count))
    assert slowest < 1.0
    assert time.monotonic() - started < 15


@pytest.mark.slow  # waits out real time (a long poll, a timeout, an interval)
async def test_a_client_that_never_reads_is_closed_within_a_bounded_backlog_of_bytes(client, api):
    """Large chunks fill a silent client's backlog long before any count of events would: it is
    closed once it is WS_BACKLOG_BYTES behind, and what it had waiting is freed at once."""
    hub = client.app[dispatch.HUB]
    admin = await api.admin()
    worker = await api.register()
    job_id = await api.submit(admin, "chatty")
    await api.claim(worker)
    silent = await open_silent_client(api, admin)
    listener = await connect(api, admin)
    chunk = "x" * (1024 * 1024)
    count = 32  # 32 MB: far past the silent client's socket buffers and its backlog
    received: list[dict] = []

    listening = asyncio.ensure_future(collect_output(listener, received, count))
    largest_backlog = 0
    try:
        for n in range(count):
            assert await stream_output(api, worker, job_id, f"{n:05d}" + chunk) == 200
            largest_backlog = max(largest_backlog, hub.backlog_bytes)
        await asyncio.wait_for(listening, 10)
    finally:
        listening.cancel()
        silent.close()

    assert largest_backlog <= dispatch.WS_BACKLOG_BYTES + 2 * len(chunk)
    assert hub.client_count == 1  # the silent one is gone; the listener kept up and stays
    assert hub.backlog_bytes == 0
    assert [int(e["data"][:5]) for e in received] == list(range(count))
    await listener.close()


async def test_one_output_chunk_larger_than_the_backlog_bound_still_reaches_a_client(api):
    admin = await api.admin()
    worker = await api.register()
    job_id = await api.submit(admin, "big")
    await api.claim(worker)
    ws = await api.client.ws_connect(f"{STREAM}?jobId={job_id}", headers={"Authorization": f"Bearer {admin}"},
                                     max_msg_size=0)  # aiohttp's client takes 4 MB messages by default
    data = "y" * (dispatch.WS_BACKLOG_BYTES + 1024)

    status = await stream_output(api, worker, job_id, data)
    event = await next_event(ws, timeout=5)

    assert status == 200
    assert (event["type"], event["data"] == data) == ("job.output", True)
    await ws.close()


# -- access that ends closes the WebSocket ---------------------------------------


async def closed_with(ws, timeout: float = 2.0) -> tuple[int, str]:
    """The close code and reason the server sent, skipping any events before it."""
    deadline = time.monotonic() + timeout
    while True:
        message = await asyncio.wait_for(ws.receive(), max(0.01, deadline - time.monotonic()))
        if message.type == aiohttp.WSMsgType.CLOSE:
            return message.data, message.extra
        assert message.type == aiohttp.WSMsgType.TEXT, message


async def test_logging_out_closes_that_tokens_websockets_and_no_others(api):
    token = await api.login(ADMIN_EMAIL, ADMIN_PASSWORD)
    other = await api.login(ADMIN_EMAIL, ADMIN_PASSWORD)
    api.forget_cookies()
    ended = await connect(api, token)
    kept = await connect(api, other)

    assert (await api.call("POST", "/api/auth/logout", token=token)).status == 200
    job_id = await api.submit(other, "after the logout")

    assert await closed_with(ended) == (aiohttp.WSCloseCode.POLICY_VIOLATION, "logged out")
    assert (await next_event(kept))["jobId"] == job_id
    await kept.close()


async def test_deleting_a_user_closes_their_websockets(api):
    token, user_id = await api.new_user()
    api.forget_cookies()
    ws = await connect(api, token)

    assert (await api.call("DELETE", f"/api/users/{user_id}", token=await api.admin())).status == 200
    await api.submit(await api.admin(), "after the deletion")

    assert await closed_with(ws) == (aiohttp.WSCloseCode.POLICY_VIOLATION, "user deleted")


async def test_revoking_an_api_token_closes_its_websockets(api):
    admin = await api.admin()
    created = await (await api.call("POST", "/api/auth/tokens", token=admin, json={"name": "wall screen"})).json()
    api.forget_cookies()
    ws = await connect(api, created["token"])

    assert (await api.call("DELETE", f"/api/auth/tokens/{created['id']}", token=admin)).status == 200

    assert await closed_with(ws) == (aiohttp.WSCloseCode.POLICY_VIOLATION, "token revoked")
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await connect(api, created["token"])
    assert refused.value.status == 401


# -- what the workers look like -----------------------------------------------------


async def heartbeat(api: Api, worker: str, **body) -> str:
    response = await api.call("POST", "/api/workers/heartbeat", worker=worker, json={"status": "idle", **body})
    assert response.status == 200, await response.text()
    return (await response.json())["serverTime"]


async def test_a_worker_is_announced_as_it_registers_runs_a_job_and_is_deleted(api):
    admin = await api.admin()
    ws = await connect(api, admin)
    worker = await api.register()
    registered = await next_event(ws)
    assert (registered["type"], registered["workerId"], registered["status"], registered["state"],
            registered["currentJobId"], registered["jobsCompleted"]) == (
        "worker.registered", "worker-001", "online", "available", None, 0)

    job_id = await api.submit(admin, "make")
    await api.claim(worker)
    await run_job(api, admin, worker, job_id, [])
    events = await events_until(ws, lambda e: e["type"] == "worker.changed" and e["currentJobId"] is None)

    assert [e["type"] for e in events] == ["job.queued", "job.started", "worker.changed", "job.completed",
                                           "worker.changed"]
    assert (events[2]["currentJobId"], events[2]["jobsCompleted"]) == (job_id, 0)
    assert events[4]["jobsCompleted"] == 1  # counted by the server as the job completed
    assert (await api.call("DELETE", "/api/workers/worker-001", token=admin)).status == 200
    assert await next_event(ws) == {"type": "worker.deleted", "workerId": "worker-001"}
    await ws.close()


async def test_approving_a_worker_is_announced(make_client):
    api = Api(await make_client(approve_workers=True))
    admin = await api.admin()
    await api.register()
    ws = await connect(api, admin)

    await api.call("POST", "/api/workers/approve", token=admin, json={"workerId": "worker-001"})

    event = await next_event(ws)
    assert (event["type"], event["workerId"], event["state"]) == ("worker.changed", "worker-001", "available")
    await ws.close()


async def test_a_heartbeat_is_announced_only_when_it_changes_what_a_page_shows(api):
    admin = await api.admin()
    worker = await api.register()
    ws = await connect(api, admin)

    await heartbeat(api, worker)
    assert await no_event_within(ws, 0.3)
    await heartbeat(api, worker, status="error")
    assert [(e["type"], e["status"]) for e in [await next_event(ws)]] == [("worker.changed", "error")]
    await heartbeat(api, worker, status="offline")  # an agent's last word
    assert [(e["type"], e["status"]) for e in [await next_event(ws)]] == [("worker.changed", "offline")]
    await ws.close()


@pytest.mark.slow  # waits out real time (a long poll, a timeout, an interval)
async def test_heartbeats_come_in_one_summary_an_interval_and_missing_them_is_announced(api, clock):
    admin = await api.admin()
    worker = await api.register()
    ws = await connect(api, admin)
    heard = await heartbeat(api, worker)

    clock.advance(31)  # a heartbeat interval later, the sweeper (every second) sums up what it heard
    assert await next_event(ws, timeout=3) == {"type": "worker.heartbeats", "lastHeartbeat": {"worker-001": heard}}
    clock.advance(60)  # three intervals since the last heartbeat
    event = await next_event(ws, timeout=3)
    assert (event["type"], event["workerId"], event["status"]) == ("worker.changed", "worker-001", "offline")
    assert await no_event_within(ws, 1.5)  # announced once, and no heartbeat to sum up
    await ws.close()


async def test_a_stream_narrowed_to_a_job_tells_nothing_of_workers(api):
    admin = await api.admin()
    job_id = await api.submit(admin)
    ws = await connect(api, admin, f"{STREAM}?jobId={job_id}")

    worker = await api.register()
    await heartbeat(api, worker, status="error")

    assert await no_event_within(ws, 0.3)
    await ws.close()
