"""The permission matrix: every endpoint against every kind of caller.

Each row lists callers in order; a caller that changes state comes last, so the ones before it
are checked against the same world. Every row gets a fresh world."""

from __future__ import annotations

import hashlib
import io
import time

import aiohttp
import jwt
import pytest

from conftest import REGISTRATION_TOKEN, Api, make_zip, secret_of

REFUSED = {"none": 401, "garbage": 401, "expired": 401, "alg-none": 401, "wrong-key": 401}


class World:
    """Owner (also by its personal API token, "owner-api") and other user, admin, a worker holding
    the owner's job on the owner's file, another worker."""

    async def build(self, api: Api, config) -> "World":
        self.api = api
        self.admin = await api.admin()
        self.owner, owner_id = await api.new_user("owner@example.com")
        self.other, _ = await api.new_user("other@example.com")
        upload = await api.upload(self.owner, make_zip({"a.txt": "a"}))
        self.file_id = upload["fileId"]
        self.url = upload["url"]
        self.job_id = await api.submit(self.owner, fileUrl=self.url)
        self.worker = await api.register("worker-a")
        self.other_worker = await api.register("worker-b")
        self.job = await api.claim(self.worker)
        # The worker holds a second job of the owner's, given as an input tree of one blob, and has
        # sent artifacts for the first.
        self.blob = BLOB_SHA
        await api.call("PUT", f"/api/blobs/{BLOB_SHA}", token=self.owner, data=io.BytesIO(BLOB))
        self.tree = [{"path": "a.txt", "sha256": BLOB_SHA, "size": len(BLOB), "mode": 0o644}]
        self.tree_job_id = await api.submit(self.owner, inputTree=self.tree)
        await api.claim(self.worker)
        sent = await api.call("POST", "/api/jobs/artifacts", worker=self.worker, data=artifacts_form(self))
        assert sent.status == 201, await sent.text()
        created = await api.call("POST", "/api/auth/tokens", token=self.owner, json={"name": "matrix"})
        self.api_token = await created.json()  # the owner's personal API token
        secret = await secret_of(config)
        now = int(time.time())
        claims = {"sub": owner_id, "role": "user", "jti": "j1", "iat": now - 100}
        self.forged = {
            "garbage": "not-a-token",
            "expired": jwt.encode({**claims, "exp": now - 10}, secret, algorithm="HS256"),
            "alg-none": jwt.encode({**claims, "exp": now + 600, "role": "admin"}, None, algorithm="none"),
            "wrong-key": jwt.encode({**claims, "exp": now + 600, "role": "admin"}, "a-guessed-secret-that-is-long-enough-to-use", algorithm="HS256"),
        }
        return self

    def headers(self, caller: str) -> dict[str, str]:
        tokens = {"owner": self.owner, "other": self.other, "admin": self.admin, "registration": REGISTRATION_TOKEN,
                  "owner-api": self.api_token["token"], **self.forged}
        if caller in tokens:
            return {"Authorization": f"Bearer {tokens[caller]}"}
        if caller == "worker":
            return {"x-worker-token": self.worker}
        if caller == "other-worker":
            return {"x-worker-token": self.other_worker}
        return {}


BLOB = b"the owner's file\n"
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()


def artifacts_form(world: World) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("jobId", world.job_id)
    form.add_field("attempt", str(world.job["attempt"]))
    form.add_field("file", io.BytesIO(make_zip({"dist/a.txt": "a"})), filename="artifacts.zip")
    return form


def blob_batch(world: World) -> io.BytesIO:
    empty = hashlib.sha256(b"").hexdigest()
    return io.BytesIO(f"{BLOB_SHA} {len(BLOB)}\n".encode() + BLOB + f"{empty} 0\n".encode())


# Bodies that are not JSON, by name.
RAW_BODIES = {"artifacts": artifacts_form, "blob": lambda world: io.BytesIO(BLOB), "blob-batch": blob_batch}


def held(world: World, **extra) -> dict:
    return {"jobId": world.job_id, "attempt": world.job["attempt"], **extra}


# (name, method, path, body, expected status by caller in order)
MATRIX = [
    ("login-me", "GET", "/api/auth/me", None, {**REFUSED, "worker": 403, "owner-api": 200, "owner": 200}),
    ("logout", "POST", "/api/auth/logout", None, {**REFUSED, "worker": 403, "owner": 200}),
    ("refresh", "POST", "/api/auth/refresh", None,
     {"none": 401, "garbage": 401, "alg-none": 401, "wrong-key": 401, "worker": 401, "owner-api": 401, "owner": 200}),
    ("create-api-token", "POST", "/api/auth/tokens", lambda w: {"name": "n"},
     {**REFUSED, "worker": 403, "registration": 401, "owner-api": 201, "owner": 201}),
    ("list-api-tokens", "GET", "/api/auth/tokens", None, {**REFUSED, "worker": 403, "owner-api": 200, "owner": 200}),
    ("delete-api-token", "DELETE", "/api/auth/tokens/{api_token}", None,
     {**REFUSED, "worker": 403, "other": 404, "admin": 404, "owner": 200}),
    ("list-users", "GET", "/api/users", None, {**REFUSED, "owner": 403, "owner-api": 403, "worker": 403, "admin": 200}),
    ("add-user", "POST", "/api/users", lambda w: {"email": "new@example.com", "password": "new-password"},
     {**REFUSED, "owner": 403, "worker": 403, "admin": 201}),
    ("register", "POST", "/api/workers/register", lambda w: {"workerId": "w-new", "hostname": "h"},
     {**REFUSED, "owner": 403, "owner-api": 403, "worker": 403, "registration": 201}),
    ("register-by-admin", "POST", "/api/workers/register", lambda w: {"workerId": "w-new", "hostname": "h"},
     {"admin": 201}),
    ("heartbeat", "POST", "/api/workers/heartbeat", lambda w: {"workerId": "worker-a", "status": "busy"},
     {**REFUSED, "owner": 403, "owner-api": 403, "admin": 403, "other-worker": 403, "worker": 200}),
    ("list-workers", "GET", "/api/workers/list", None, {**REFUSED, "worker": 403, "owner": 200, "admin": 200}),
    ("get-worker", "GET", "/api/workers/worker-a", None, {**REFUSED, "worker": 403, "owner": 200}),
    ("delete-worker", "DELETE", "/api/workers/worker-b", None,
     {**REFUSED, "owner": 403, "other-worker": 403, "admin": 200}),
    ("approve-worker", "POST", "/api/workers/approve", lambda w: {"workerId": "worker-b"},
     {**REFUSED, "owner": 403, "owner-api": 403, "worker": 403, "registration": 401, "admin": 200}),
    ("pause-worker", "POST", "/api/workers/pause", lambda w: {"workerId": "worker-b"},
     {**REFUSED, "owner": 403, "owner-api": 403, "worker": 403, "registration": 401, "admin": 200}),
    ("resume-worker", "POST", "/api/workers/resume", lambda w: {"workerId": "worker-b"},
     {**REFUSED, "owner": 403, "owner-api": 403, "worker": 403, "registration": 401, "admin": 200}),
    ("rotate-registration-token", "POST", "/api/workers/registration-token", None,  # pinned here: 409
     {**REFUSED, "owner": 403, "owner-api": 403, "worker": 403, "registration": 401, "admin": 409}),
    ("submit", "POST", "/api/jobs/submit", lambda w: {"command": "make"},
     {**REFUSED, "worker": 403, "owner-api": 201, "owner": 201, "admin": 201}),
    ("submit-with-anothers-file", "POST", "/api/jobs/submit", lambda w: {"command": "make", "fileUrl": w.url},
     {"other": 400, "owner": 201, "admin": 201}),
    ("status", "GET", "/api/jobs/status?jobId={job}", None, {**REFUSED, "worker": 403, "other": 200, "owner": 200}),
    ("list-jobs", "GET", "/api/jobs/list", None, {**REFUSED, "worker": 403, "other": 200, "owner": 200}),
    ("get-job", "GET", "/api/jobs/get-job", None,
     {**REFUSED, "owner": 403, "owner-api": 403, "admin": 403, "worker": 204}),
    ("stream-output", "POST", "/api/jobs/stream-output", lambda w: held(w, data="x", type="stdout"),
     {**REFUSED, "owner": 403, "owner-api": 403, "admin": 403, "other-worker": 409, "worker": 200}),
    ("submit-result", "POST", "/api/jobs/submit-result", lambda w: held(w, exitCode=0),
     {**REFUSED, "owner": 403, "admin": 403, "other-worker": 409, "worker": 200}),
    ("cancel-by-owner", "POST", "/api/jobs/cancel", lambda w: {"jobId": w.job_id},
     {**REFUSED, "other": 403, "worker": 403, "owner": 200}),
    ("cancel-by-admin", "POST", "/api/jobs/cancel", lambda w: {"jobId": w.job_id}, {"admin": 200}),
    ("upload", "POST", "/api/files/upload", "file", {**REFUSED, "worker": 403, "owner": 201}),
    ("download", "GET", "/api/files/download/{file}", None,
     {**REFUSED, "other": 403, "other-worker": 403, "worker": 200, "owner-api": 200, "owner": 200, "admin": 200}),
    ("upload-url", "GET", "{url}", None,
     {**REFUSED, "other": 403, "other-worker": 403, "worker": 200, "owner": 200, "admin": 200}),
    ("delete-user", "DELETE", "/api/users/{owner_id}", None, {**REFUSED, "other": 403, "worker": 403, "admin": 200}),
    ("follow", "GET", "/api/jobs/follow?jobId={job}", None,
     {**REFUSED, "worker": 403, "other": 200, "owner-api": 200, "owner": 200}),
    ("send-artifacts", "POST", "/api/jobs/artifacts", "artifacts",
     {**REFUSED, "owner": 403, "owner-api": 403, "admin": 403, "other-worker": 409, "worker": 201}),
    ("download-artifacts", "GET", "/api/jobs/artifacts?jobId={job}", None,
     {**REFUSED, "other": 403, "worker": 403, "other-worker": 403, "owner-api": 200, "owner": 200, "admin": 200}),
    ("blobs-missing", "POST", "/api/blobs/missing", lambda w: {"sha256": [w.blob]},
     {**REFUSED, "worker": 403, "other": 200, "owner-api": 200, "owner": 200}),
    ("put-blob", "PUT", f"/api/blobs/{BLOB_SHA}", "blob", {**REFUSED, "worker": 403, "other": 201, "owner-api": 201}),
    ("blob-batch", "POST", "/api/blobs/batch", "blob-batch", {**REFUSED, "worker": 403, "other": 201, "owner": 201}),
    ("fetch-blobs", "POST", "/api/blobs/fetch", lambda w: {"jobId": w.tree_job_id, "sha256": [w.blob]},
     {**REFUSED, "owner": 403, "owner-api": 403, "admin": 403, "other-worker": 409, "worker": 200}),
    ("submit-with-anothers-blob", "POST", "/api/jobs/submit", lambda w: {"command": "make", "inputTree": w.tree},
     {"other": 400, "owner-api": 201, "admin": 201}),
]


@pytest.mark.parametrize("name, method, path, body, expected", MATRIX, ids=[row[0] for row in MATRIX])
async def test_permission_matrix(api, config, name, method, path, body, expected):
    world = await World().build(api, config)
    me = await (await api.call("GET", "/api/auth/me", token=world.owner)).json()
    path = path.format(job=world.job_id, file=world.file_id, url=world.url, owner_id=me["user"]["id"],
                       api_token=world.api_token["id"])
    got = {}
    api.forget_cookies()  # every caller brings only its own credentials
    for caller in expected:
        kwargs = {}
        if body == "file":
            form = aiohttp.FormData()
            form.add_field("file", b"data", filename="f.zip")
            kwargs["data"] = form
        elif body in RAW_BODIES:
            kwargs["data"] = RAW_BODIES[body](world)
        elif body is not None:
            kwargs["json"] = body(world)
        response = await api.client.request(method, path, headers=world.headers(caller), **kwargs)
        got[caller] = response.status
        if response.status >= 400:
            assert set(await response.json()) >= {"error", "message", "code"}
    assert got == expected
