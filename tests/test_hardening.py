"""The findings of the outside review (issue 11), server side: revocations that last, one winner
among racing refreshes, no 500s on long passwords, deep JSON or long upload names, login timing,
no raw credential in the log; and what a stolen registration token can no longer do: worker
approval, open registration as the contract shows it, rotating the registration token.
The WebSocket findings (a bounded backlog, closing when access ends) are in test_ws.py, personal
API tokens in test_auth.py."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import aiosqlite
import pytest

import dispatch
from conftest import ADMIN_EMAIL, ADMIN_PASSWORD, REGISTRATION_TOKEN, ROOT, Api, make_zip, old_database, secret_of, stored

LONG_PASSWORD = "é" * 37  # 37 characters, 74 bytes: long enough for the 8-character rule, too long for bcrypt
WORKER = {"workerId": "desktop-1", "hostname": "desktop-1"}


def refused_field(body: dict) -> str | None:
    return (body.get("details") or {}).get("field")


async def raw_request(api: Api, head: bytes) -> bytes:
    """Send bytes exactly as written and return the whole answer."""
    reader, writer = await asyncio.open_connection(api.client.host, api.client.port)
    writer.write(head)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return answer


# -- 1 and 2: logout lasts, refresh has one winner ------------------------------------


async def test_a_logged_out_token_cannot_be_refreshed_after_it_expired_and_revocations_were_swept(
        client, api, clock):
    token = await api.login(ADMIN_EMAIL, ADMIN_PASSWORD)
    api.forget_cookies()
    assert (await api.call("POST", "/api/auth/logout", token=token)).status == 200

    clock.advance(dispatch.TOKEN_LIFETIME.total_seconds() + 3600)  # past exp, within the refresh grace
    await dispatch._sweep_storage(client.app)
    response = await api.call("POST", "/api/auth/refresh", token=token)

    assert response.status == 401
    assert (await response.json())["code"] == "TOKEN_REVOKED"


async def test_ten_concurrent_refreshes_of_one_token_give_exactly_one_new_token(api):
    token = await api.login(ADMIN_EMAIL, ADMIN_PASSWORD)
    api.forget_cookies()
    # Ten open connections first, so that the ten refreshes arrive together rather than one per connect.
    await asyncio.gather(*(api.call("GET", "/api/health") for _ in range(10)))

    responses = await asyncio.gather(*(api.call("POST", "/api/auth/refresh", token=token) for _ in range(10)))

    assert sorted(r.status for r in responses) == [200] + [401] * 9
    [new] = [(await r.json())["token"] for r in responses if r.status == 200]
    api.forget_cookies()
    assert (await api.call("GET", "/api/auth/me", token=new)).status == 200


# -- 8: no 500s -------------------------------------------------------------------------


@pytest.mark.parametrize("email", [ADMIN_EMAIL, "nobody@example.com"])
async def test_a_password_over_72_bytes_is_a_400_at_login(api, email):
    response = await api.call("POST", "/api/auth/login", json={"email": email, "password": LONG_PASSWORD})

    body = await response.json()
    assert response.status == 400, body
    assert (body["code"], refused_field(body)) == ("VALIDATION_ERROR", "password")


async def test_a_password_over_72_bytes_is_a_400_for_a_new_user_and_adds_nobody(api):
    admin = await api.admin()

    response = await api.call("POST", "/api/users", token=admin,
                              json={"email": "dev@example.com", "password": LONG_PASSWORD, "role": "user"})

    body = await response.json()
    assert response.status == 400, body
    assert (body["code"], refused_field(body)) == ("VALIDATION_ERROR", "password")
    users = await (await api.call("GET", "/api/users", token=admin)).json()
    assert [u["email"] for u in users["users"]] == [ADMIN_EMAIL]


@pytest.mark.slow
def test_user_add_refuses_a_password_over_72_bytes_without_a_traceback(tmp_path):
    command = [sys.executable, str(ROOT / "dispatch.py"), "--data-dir", str(tmp_path / "data"),
               "user", "add", "dev@example.com", "--password-stdin", "--create"]

    refused = subprocess.run(command, input=LONG_PASSWORD + "\n", capture_output=True, text=True, timeout=30)
    added = subprocess.run(command, input="a-fine-password\n", capture_output=True, text=True, timeout=30)

    assert refused.returncode != 0
    assert "at most 72 bytes" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert added.returncode == 0, added.stderr  # the refusal wrote nothing: the email is still free


@pytest.mark.parametrize("path", ["/api/auth/login", "/api/jobs/submit"])
@pytest.mark.parametrize("nested", ["[" * 1000 + "]" * 1000, '{"a":' * 1000 + "1" + "}" * 1000])
async def test_json_nested_1000_deep_is_a_400(api, path, nested):
    admin = await api.admin()

    response = await api.call("POST", path, token=admin, data=nested, headers={"Content-Type": "application/json"})

    assert response.status == 400
    assert (await response.json())["code"] == "INVALID_JSON"
    assert (await (await api.call("GET", "/api/jobs/list", token=admin)).json())["total"] == 0


async def test_a_lone_surrogate_in_json_is_a_400_and_a_surrogate_pair_is_text(api):
    admin = await api.admin()
    headers = {"Content-Type": "application/json"}

    lone = await api.call("POST", "/api/jobs/submit", token=admin, data='{"command": "echo \\ud800"}',
                          headers=headers)
    pair = await api.call("POST", "/api/jobs/submit", token=admin, data='{"command": "echo \\ud83d\\ude00"}',
                          headers=headers)

    assert lone.status == 400
    assert (await lone.json())["code"] == "INVALID_JSON"
    assert pair.status == 201
    assert (await api.status(admin, (await pair.json())["jobId"]))["command"] == "echo 😀"


@pytest.mark.parametrize("header", ["Authorization: Bearer abc\xffdef", "x-worker-token: abc\xffdef"])
async def test_a_credential_that_is_not_ascii_is_a_401(api, header):
    head = (f"GET /api/jobs/list HTTP/1.1\r\nHost: dispatch\r\nConnection: close\r\n{header}\r\n\r\n"
            ).encode("latin-1")

    answer = await raw_request(api, head)

    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b'"code": "INVALID_TOKEN"' in answer


def uploaded_entries(config) -> list[Path]:
    return sorted((Path(config.data_dir) / "uploads").rglob("*"))


async def test_an_upload_named_with_200_e_acute_is_stored_under_a_name_capped_in_bytes(api, config):
    token = await api.admin()
    content = make_zip({"a.txt": "a"})
    boundary = "hardening-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{"é" * 200}.zip"\r\n'
            f"Content-Type: application/zip\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()

    response = await api.call("POST", "/api/files/upload", token=token, data=body,
                              headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})

    upload = await response.json()
    assert response.status == 201, upload
    name = upload["filename"]
    assert len(name.encode()) <= dispatch.MAX_FILENAME_BYTES
    assert name == "é" * ((dispatch.MAX_FILENAME_BYTES - 4) // 2) + ".zip"  # cut between characters
    download = await api.call("GET", upload["url"], token=token)
    assert (download.status, await download.read()) == (200, content)
    assert await stored(config) == [f"uploads/{upload['fileId']}/{name}"]


async def test_an_upload_that_cannot_be_recorded_leaves_no_folder_or_file(api, config, client, monkeypatch):
    token = await api.admin()

    async def database_gone(record):
        raise aiosqlite.OperationalError("disk I/O error")

    monkeypatch.setattr(client.app[dispatch.STORE], "insert_file", database_gone)
    form = aiohttp.FormData()
    form.add_field("file", make_zip({"a.txt": "a"}), filename="project.zip")
    response = await api.call("POST", "/api/files/upload", token=token, data=form)

    assert response.status == 503
    assert uploaded_entries(config) == [] and await stored(config) == []  # no folder either


# -- 9: login timing ----------------------------------------------------------------------


async def test_an_unknown_email_takes_as_long_as_a_wrong_password_with_a_costlier_hash(api, config):
    """A user added as ``user add`` does, on its own connection, with a higher bcrypt cost than the
    server's setting."""
    store = await dispatch.Store.open(Path(config.data_dir) / "dispatch.db")
    try:
        await dispatch.create_user(store, "slow@example.com", "slow-password", "user", rounds=10)
    finally:
        await store.close()

    async def login_time(email: str) -> float:
        started = time.perf_counter()
        response = await api.call("POST", "/api/auth/login", json={"email": email, "password": "wrong-password"})
        assert response.status == 401
        return time.perf_counter() - started

    known = min([await login_time("slow@example.com") for _ in range(3)])
    unknown = min([await login_time("nobody@example.com") for _ in range(3)])

    assert unknown > 0.5 * known, (unknown, known)


# -- 10: no credential in the log ---------------------------------------------------------


@pytest.mark.parametrize("header", ["Authorization: Bearer {token}\x01", "x-worker-token: {token}\x01tail"])
async def test_a_credential_header_with_a_bad_byte_never_reaches_the_log(api, caplog, header):
    token = await api.admin()
    caplog.set_level(logging.DEBUG)
    head = (f"GET /api/jobs/list HTTP/1.1\r\nHost: dispatch\r\n{header.format(token=token)}\r\n\r\n").encode()

    answer = await raw_request(api, head)

    assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400"), answer[:100]
    logged = caplog.text
    assert "BadHttpMessage" in logged  # it was logged, without the request
    assert token[:20] not in logged and token[-20:] not in logged
    assert "Traceback" not in logged


# -- worker approval ------------------------------------------------------------------------


async def register(api: Api, token: str | None = REGISTRATION_TOKEN, **fields) -> dict:
    response = await api.call("POST", "/api/workers/register", token=token, json={**WORKER, **fields})
    assert response.status == 201, await response.text()
    return await response.json()


async def approve(api: Api, worker_id: str = WORKER["workerId"], token: str | None = None):
    return await api.call("POST", "/api/workers/approve", token=token or await api.admin(),
                          json={"workerId": worker_id})


async def worker_state(api: Api, worker_id: str = WORKER["workerId"]) -> str:
    response = await api.call("GET", f"/api/workers/{worker_id}", token=await api.admin())
    return (await response.json())["worker"]["state"]


async def test_with_approval_on_a_new_worker_is_pending_and_gets_no_job_until_approved(make_client):
    api = Api(await make_client(approve_workers=True))
    admin = await api.admin()
    worker = await register(api)
    job_id = await api.submit(admin, "make")

    assert worker["state"] == "pending"
    listed = await (await api.call("GET", "/api/workers/list", token=admin)).json()
    assert [(w["workerId"], w["state"], w["status"]) for w in listed["workers"]] == [("desktop-1", "pending", "online")]
    assert await api.claim(worker["token"]) is None
    assert (await api.call("POST", "/api/workers/heartbeat", worker=worker["token"], json={})).status == 200

    approved = await approve(api)

    assert (approved.status, await approved.json()) == (200, {"success": True, "workerId": "desktop-1",
                                                              "state": "available"})
    assert await worker_state(api) == "available"
    assert (await api.claim(worker["token"]))["jobId"] == job_id
    assert (await approve(api)).status == 200  # approving again changes nothing


async def test_a_pending_workers_long_poll_waits_and_ends_when_it_is_approved(make_client):
    api = Api(await make_client(approve_workers=True))
    worker = await register(api)
    await api.submit(await api.admin(), "make")

    started = time.monotonic()
    assert await api.claim(worker["token"], wait=0.3) is None
    assert time.monotonic() - started >= 0.3  # it waited out its poll: no agent spins on a pending worker

    parked = asyncio.ensure_future(api.claim(worker["token"], wait=10))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await approve(api)
    assert await asyncio.wait_for(parked, 2) is None
    assert time.monotonic() - started < 1
    assert await api.claim(worker["token"]) is not None


async def test_a_parked_pending_worker_takes_no_wake_up_meant_for_an_available_one(make_client):
    api = Api(await make_client(approve_workers=True))
    admin = await api.admin()
    pending = await register(api)
    available = await register(api, token=admin, workerId="desktop-2")  # an admin's registration approves
    assert available["state"] == "available"

    pending_poll = asyncio.ensure_future(api.claim(pending["token"], wait=5))
    await asyncio.sleep(0.1)
    available_poll = asyncio.ensure_future(api.claim(available["token"], wait=5))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    job_id = await api.submit(admin, "make")

    assert (await asyncio.wait_for(available_poll, 2))["jobId"] == job_id
    assert time.monotonic() - started < 1
    pending_poll.cancel()


@pytest.mark.parametrize("body, caller, status, code", [
    ({"workerId": "desktop-1"}, "user", 403, "FORBIDDEN"),
    ({"workerId": "nobody"}, "admin", 404, "NOT_FOUND"),
    ({}, "admin", 400, "VALIDATION_ERROR"),
    ({"workerId": 7}, "admin", 400, "VALIDATION_ERROR"),
])
async def test_a_bad_approval_is_refused_and_changes_nothing(make_client, body, caller, status, code):
    api = Api(await make_client(approve_workers=True))
    await register(api)
    token = (await api.new_user())[0] if caller == "user" else await api.admin()

    response = await api.call("POST", "/api/workers/approve", token=token, json=body)

    assert (response.status, (await response.json())["code"]) == (status, code)
    assert await worker_state(api) == "pending"


# -- open registration: the contract's register --------------------------------------------


async def test_open_registration_needs_no_token_and_every_new_worker_waits_for_approval(make_client):
    api = Api(await make_client(open_registration=True))
    admin = await api.admin()
    api.forget_cookies()
    job_id = await api.submit(admin, "npm test")

    contract = await api.call("POST", "/api/workers/register",
                              json={"workerId": "worker-001", "hostname": "desktop-pc", "cpuCount": 8})
    by_token = await register(api, workerId="worker-002")

    body = await contract.json()
    assert contract.status == 201, body
    assert {"success", "workerId", "token", "registeredAt"} <= set(body)
    assert (body["state"], by_token["state"]) == ("pending", "pending")
    assert await api.claim(body["token"]) is None
    await approve(api, "worker-001")
    assert (await api.claim(body["token"]))["jobId"] == job_id


async def test_without_open_registration_the_contracts_tokenless_register_is_401(api):
    api.forget_cookies()

    response = await api.call("POST", "/api/workers/register", json={"workerId": "w", "hostname": "h"})

    assert (response.status, (await response.json())["code"]) == (401, "REGISTRATION_TOKEN_REQUIRED")


# -- rotating the registration token ---------------------------------------------------------


async def test_rotating_the_registration_token_stops_the_old_one_at_once_and_survives_a_restart(
        make_client, config):
    api = Api(await make_client(registration_token=""))
    old = await secret_of(config, "registration_token")
    registered = await register(api, token=old)

    response = await api.call("POST", "/api/workers/registration-token", token=await api.admin())

    body = await response.json()
    new = body["token"]
    assert (response.status, body["success"]) == (200, True)
    assert new != old and len(new) >= 20
    assert await secret_of(config, "registration_token") == new
    assert (await api.call("POST", "/api/workers/register", token=old, json={**WORKER, "workerId": "w2"})).status == 401
    assert (await register(api, token=new, workerId="w3"))["state"] == "available"
    heartbeat = await api.call("POST", "/api/workers/heartbeat", worker=registered["token"], json={})
    assert heartbeat.status == 200  # registered workers keep their own tokens
    await api.client.close()

    restarted = Api(await make_client(registration_token=""))
    assert (await restarted.call("POST", "/api/workers/register", token=old,
                                 json={**WORKER, "workerId": "w4"})).status == 401
    assert (await register(restarted, token=new, workerId="w5"))["workerId"] == "w5"


async def test_a_registration_token_set_by_the_environment_cannot_be_rotated(api):
    response = await api.call("POST", "/api/workers/registration-token", token=await api.admin())

    body = await response.json()
    assert (response.status, body["code"]) == (409, "REGISTRATION_TOKEN_PINNED")
    assert "DISPATCH_REGISTRATION_TOKEN" in body["message"]
    assert (await register(api))["workerId"] == "desktop-1"  # the pinned token still works


# -- schema ------------------------------------------------------------------------------------


async def test_a_version_2_database_keeps_its_workers_and_they_are_available(tmp_path):
    path = tmp_path / "dispatch.db"
    db = old_database(path, "ad609ce")
    db.execute("INSERT INTO workers (id, token_hash, hostname, registered_at, last_heartbeat)"
               " VALUES ('w', ?, 'h', '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z')",
               (hashlib.sha256(b"t").hexdigest(),))
    db.commit()
    db.close()

    store = await dispatch.Store.open(path)
    try:
        worker = await store.worker_by_token_hash(hashlib.sha256(b"t").hexdigest())
    finally:
        await store.close()

    assert (worker["id"], worker["state"]) == ("w", "available")
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == dispatch.SCHEMA_VERSION
