"""Files: upload (size limit, hostile names), download (headers, permissions, path tricks),
and a worker's access through the fileUrl of the job it holds."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import io
import os
import re
from email.message import Message
from pathlib import Path

import aiohttp
import pytest

from conftest import ISO_MS, Api, make_zip, secret_of, stored

FILE_ID = re.compile(r"^file-[0-9a-f]{32}$")



def uploads_dir(config) -> Path:
    return Path(config.data_dir) / "uploads"


def multipart(disposition_params: bytes, content: bytes,
              boundary: bytes = b"dispatch-test-boundary") -> tuple[bytes, str]:
    """A multipart body written byte by byte, so a test controls exactly what a hostile client sends
    (aiohttp's FormData would escape the filename for us)."""
    body = (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"file\"; " + disposition_params +
            b"\r\nContent-Type: application/zip\r\n\r\n" + content + b"\r\n--" + boundary + b"--\r\n")
    return body, f"multipart/form-data; boundary={boundary.decode()}"


async def upload_raw(api: Api, token: str, body, content_type: str):
    return await api.call("POST", "/api/files/upload", token=token, data=body, headers={"Content-Type": content_type})


def disposition_filename(header: str) -> str | None:
    message = Message()
    message["Content-Disposition"] = header
    return message.get_filename()


async def raw_get(api: Api, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """GET with the request target sent exactly as written (no client-side normalising or quoting)."""
    reader, writer = await asyncio.open_connection(api.client.host, api.client.port)
    lines = [f"GET {path} HTTP/1.1", f"Host: {api.client.host}:{api.client.port}", "Connection: close",
             *(f"{k}: {v}" for k, v in headers.items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    return int(response.split(b" ", 2)[1]), response


# -- upload ---------------------------------------------------------------------


async def test_upload_returns_201_with_size_sha256_url_and_expiry(api, config):
    content = make_zip({"package.json": '{"name": "x"}', "src/index.js": "console.log(1)\n" * 100})
    token = await api.admin()

    form = aiohttp.FormData()
    form.add_field("file", content, filename="project.zip", content_type="application/zip")
    response = await api.call("POST", "/api/files/upload", token=token, data=form)

    body = await response.json()
    assert response.status == 201
    assert body["success"] is True
    assert FILE_ID.match(body["fileId"])
    assert (body["filename"], body["size"]) == ("project.zip", len(content))
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    assert body["url"] == f"/uploads/{body['fileId']}/project.zip"
    assert ISO_MS.match(body["uploadedAt"]) and ISO_MS.match(body["expiresAt"])
    uploaded = dt.datetime.fromisoformat(body["uploadedAt"].replace("Z", "+00:00"))
    expires = dt.datetime.fromisoformat(body["expiresAt"].replace("Z", "+00:00"))
    assert expires - uploaded == dt.timedelta(days=config.file_ttl_days)
    assert await stored(config) == [f"uploads/{body['fileId']}/project.zip"]


async def test_upload_expiry_follows_the_configured_ttl(make_client):
    api = Api(await make_client(file_ttl_days=2))

    body = await api.upload(await api.admin(), b"PK")

    uploaded = dt.datetime.fromisoformat(body["uploadedAt"].replace("Z", "+00:00"))
    expires = dt.datetime.fromisoformat(body["expiresAt"].replace("Z", "+00:00"))
    assert expires - uploaded == dt.timedelta(days=2)


async def test_a_plain_user_may_upload_but_a_worker_and_nobody_may_not(api, config):
    user, _ = await api.new_user()
    worker = await api.register()
    api.forget_cookies()

    def form():
        data = aiohttp.FormData()
        data.add_field("file", b"PK", filename="p.zip")
        return data

    statuses = [(await api.call("POST", "/api/files/upload", data=form(), **creds)).status
                for creds in ({"token": user}, {"worker": worker}, {})]

    assert statuses == [201, 403, 401]
    assert len(await stored(config)) == 1


async def test_an_upload_over_the_limit_is_400_and_leaves_nothing(make_client, config):
    api = Api(await make_client(max_upload_mb=1))
    token = await api.admin()
    form = aiohttp.FormData()
    form.add_field("file", io.BytesIO(os.urandom(2 * 1024 * 1024)), filename="big.zip",
                   content_type="application/zip")

    response = await api.call("POST", "/api/files/upload", token=token, data=form)

    body = await response.json()
    assert response.status == 400
    assert (body["error"], body["message"]) == ("Invalid file", "File size exceeds 1MB limit")
    assert await stored(config) == []
    assert [p.name for p in uploads_dir(config).iterdir()] == []
    assert (await api.upload(token, b"small enough"))["size"] == 12  # and the server is fine afterwards


async def test_a_streamed_upload_over_the_limit_is_400_and_leaves_no_partial_file(make_client, config):
    """Chunked, so no Content-Length warns the server: it must stop while writing and clean up."""
    api = Api(await make_client(max_upload_mb=1))
    token = await api.admin()
    body, content_type = multipart(b'filename="big.zip"', os.urandom(2 * 1024 * 1024))

    async def chunks():
        for start in range(0, len(body), 64 * 1024):
            yield body[start:start + 64 * 1024]

    response = await upload_raw(api, token, chunks(), content_type)

    assert response.status == 400
    assert (await response.json())["error"] == "Invalid file"
    assert await stored(config) == []
    assert [p.name for p in uploads_dir(config).iterdir()] == []


async def test_an_upload_just_under_the_limit_is_accepted(make_client, config):
    api = Api(await make_client(max_upload_mb=1))
    content = os.urandom(1024 * 1024)

    body = await api.upload(await api.admin(), content, "exactly-1mb.zip")

    assert body["size"] == len(content)
    assert body["sha256"] == hashlib.sha256(content).hexdigest()


@pytest.mark.parametrize("field_name", ["upload", "files", "File"])
async def test_upload_without_a_file_field_is_400(api, config, field_name):
    form = aiohttp.FormData()
    form.add_field(field_name, b"PK", filename="project.zip")

    response = await api.call("POST", "/api/files/upload", token=await api.admin(), data=form)

    body = await response.json()
    assert response.status == 400
    assert body["error"] == "Invalid file"
    assert "file" in body["message"]
    assert await stored(config) == []


@pytest.mark.parametrize("body, content_type", [
    (b'{"file": "project.zip"}', "application/json"),
    (b"", "multipart/form-data; boundary=x"),
    (b"garbage without any boundary", "multipart/form-data; boundary=x"),
    (b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\rb.zip\"\r\n\r\nPK\r\n--x--\r\n",
     "multipart/form-data; boundary=x"),
    (b"--x\r\nno colon in this header line\r\n\r\nPK\r\n--x--\r\n", "multipart/form-data; boundary=x"),
    (b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"tab\there\x7f.zip\"\r\n\r\nPK\r\n--x--\r\n",
     "multipart/form-data; boundary=x"),
], ids=["json", "empty", "no-boundary", "cr-in-part-header", "part-header-without-colon", "del-in-part-header"])
async def test_a_malformed_upload_is_400_never_500(api, config, body, content_type):
    response = await upload_raw(api, await api.admin(), body, content_type)

    assert response.status == 400, await response.text()
    assert (await response.json())["error"] in ("Invalid file", "Invalid request")
    assert await stored(config) == []


@pytest.mark.parametrize("params", [
    b'filename="../../etc/passwd"',
    b'filename="..\\\\..\\\\x.zip"',
    b'filename="..\\..\\x.zip"',
    b'filename="/etc/cron.d/evil"',
    b'filename="C:\\\\Windows\\\\evil.zip"',
    b'filename="a\\"b.zip"',
    b'filename="quote\'s \\"and\\" <more>.zip"',
    b"filename*=UTF-8''..%2F..%2Fevil%0A%0D%22.zip",
    b'filename="line%0Abreak.zip"',
    b'filename="a; filename=evil.exe"',
    b'filename=".."',
    b'filename="."',
    b'filename=""',
    b'filename="' + "\u00fc\u00e9.zip".encode() + b'"',
])
async def test_hostile_filenames_are_stored_inside_uploads_and_served_with_a_safe_header(api, config, params):
    token = await api.admin()
    content = b"PK hostile"
    body, content_type = multipart(params, content)

    response = await upload_raw(api, token, body, content_type)

    assert response.status == 201, await response.text()
    upload = await response.json()
    name = upload["filename"]
    assert name and name not in (".", "..")
    assert not set(name) & set('/\\"\r\n\0')
    assert await stored(config) == [f"uploads/{upload['fileId']}/{name}"]
    assert not (Path(config.data_dir).parent / "etc").exists()

    download = await api.call("GET", f"/api/files/download/{upload['fileId']}", token=token)
    assert download.status == 200
    assert await download.read() == content
    header = download.headers["Content-Disposition"]
    assert header.startswith("attachment;")
    assert not set(header) & set("\r\n\0")
    assert disposition_filename(header) == name
    via_url = await api.call("GET", upload["url"], token=token)
    assert via_url.status == 200 and await via_url.read() == content


async def test_an_upload_cut_short_before_its_closing_boundary_is_refused(api, config):
    """The body ends in the middle of the file part: storing what came would keep a truncated zip
    as if it were whole."""
    body = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.zip"\r\n\r\nPK\x03\x04 first half'

    response = await upload_raw(api, await api.admin(), body, "multipart/form-data; boundary=x")

    assert response.status == 400, await response.text()
    assert await stored(config) == []


# -- download -------------------------------------------------------------------


async def test_download_sends_the_content_as_an_attachment(api):
    token = await api.admin()
    content = make_zip({"README": "hello"})
    upload = await api.upload(token, content)

    response = await api.call("GET", f"/api/files/download/{upload['fileId']}", token=token)

    assert response.status == 200
    assert await response.read() == content
    assert response.headers["Content-Type"] == "application/zip"
    header = response.headers["Content-Disposition"]
    assert header.startswith('attachment; filename="project.zip"')
    assert disposition_filename(header) == "project.zip"


async def test_the_upload_url_serves_the_same_file(api):
    token = await api.admin()
    content = make_zip({"README": "hello"})
    upload = await api.upload(token, content)

    response = await api.call("GET", upload["url"], token=token)
    wrong_name = await api.call("GET", upload["url"].replace("project.zip", "other.zip"), token=token)

    assert response.status == 200
    assert await response.read() == content
    assert wrong_name.status == 404


async def test_another_user_may_not_download_but_an_admin_may(api):
    alice, _ = await api.new_user("alice@example.com")
    bob, _ = await api.new_user("bob@example.com")
    upload = await api.upload(alice, b"alice's secret")
    api.forget_cookies()

    for path in (f"/api/files/download/{upload['fileId']}", upload["url"]):
        as_bob = await api.call("GET", path, token=bob)
        as_alice = await api.call("GET", path, token=alice)
        as_admin = await api.call("GET", path, token=await api.admin())
        api.forget_cookies()
        anonymous = await api.call("GET", path)

        assert (as_bob.status, as_alice.status, as_admin.status, anonymous.status) == (403, 200, 200, 401), path
        assert b"secret" not in await as_bob.read()
        assert await as_admin.read() == b"alice's secret"


@pytest.mark.parametrize("file_id", ["file-" + "0" * 32, "file-nope", "project.zip", "x" * 300])
async def test_an_unknown_file_is_404_with_the_contract_body(api, file_id):
    response = await api.call("GET", f"/api/files/download/{file_id}", token=await api.admin())

    body = await response.json()
    assert response.status == 404
    assert (body["error"], body["message"]) == ("Not found", "File not found")


@pytest.mark.parametrize("path", [
    "/api/files/download/..%2F..%2Fdispatch.db",
    "/api/files/download/..%2f..%2fjwt_secret",
    "/api/files/download/%2e%2e%2f%2e%2e%2fdispatch.db",
    "/api/files/download/..%5C..%5Cdispatch.db",
    "/api/files/download/..%252F..%252Fdispatch.db",
    "/api/files/download/../../dispatch.db",
    "/api/files/download/%2e%2e",
    "/api/files/download/FILEID%2F..%2F..%2Fdispatch.db",
    "/api/files/download/FILEID%00",
    "/uploads/..%2F..%2Fdispatch.db/x",
    "/uploads/FILEID/..%2F..%2F..%2Fdispatch.db",
    "/uploads/FILEID/%2e%2e%2f%2e%2e%2fjwt_secret",
    "/uploads/FILEID/../../dispatch.db",
    "/uploads/../dispatch.db",
])
async def test_path_tricks_in_download_urls_never_serve_another_file(api, config, path):
    token = await api.admin()
    upload = await api.upload(token, b"PK the real upload")
    secret = (await secret_of(config)).encode()

    status, raw = await raw_get(api, path.replace("FILEID", upload["fileId"]),
                                {"Authorization": f"Bearer {token}"})

    assert status in (400, 403, 404), raw[:300]
    assert b"SQLite format 3" not in raw
    assert secret not in raw


# -- workers --------------------------------------------------------------------


async def test_a_worker_may_download_only_the_file_of_a_job_it_holds(api):
    admin = await api.admin()
    content = make_zip({"package.json": "{}"})
    upload = await api.upload(admin, content)
    other_upload = await api.upload(admin, b"PK not for this job", "other.zip")
    job_id = await api.submit(admin, "npm test", fileUrl=upload["url"])
    worker = await api.register("worker-001")
    bystander = await api.register("worker-002")
    api.forget_cookies()
    by_id = f"/api/files/download/{upload['fileId']}"

    before = await api.call("GET", by_id, worker=worker)
    assert before.status == 403
    assert (await api.call("GET", upload["url"], worker=worker)).status == 403

    job = await api.claim(worker)
    assert job["jobId"] == job_id
    held = await api.client.session.get(job["fileUrl"], headers={"x-worker-token": worker})
    assert held.status == 200
    assert await held.read() == content
    assert held.headers["Content-Type"] == "application/zip"
    assert (await api.call("GET", by_id, worker=worker)).status == 200
    assert (await api.call("GET", by_id, worker=bystander)).status == 403
    assert (await api.call("GET", f"/api/files/download/{other_upload['fileId']}", worker=worker)).status == 403

    done = await api.call("POST", "/api/jobs/submit-result", worker=worker,
                          json={"jobId": job_id, "workerId": "worker-001", "exitCode": 0})
    assert done.status == 200
    assert (await api.call("GET", by_id, worker=worker)).status == 403  # no longer holds it
