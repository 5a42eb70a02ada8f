"""Where the contents of uploads, blobs and artifacts live: files in the data dir with SQLite, rows of
file_chunks with PostgreSQL (issue 16), so that every server serves every file and one pg_dump holds
them all. Either way a content is kept whole or not at all, and never read mixed with another."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time

import dispatch
from conftest import Api, make_zip, postgresql_only, run_sql, stored
from test_artifacts import send
from test_blobs import entry, fetch, put, submit_tree
from test_cluster import other  # noqa: F401 (a fixture: a second server on the same database)

ROW = dispatch.CONTENT_CHUNK_BYTES


async def eventually(check, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "gave up waiting"
        await asyncio.sleep(0.05)


@postgresql_only
async def test_every_server_serves_every_upload_blob_and_artifact_and_no_data_dir_holds_them(api, other, config):
    admin = await api.admin()
    project, blob = os.urandom(3 * ROW + 5), os.urandom(ROW + 7)  # rows, and a short last one
    artifacts = make_zip({"dist/app.bin": os.urandom(ROW)})
    upload = await api.upload(admin, project)
    assert (await put(api, admin, blob)).status == 201
    submitted = await submit_tree(api, admin, [entry("src/app.bin", blob)], artifacts=["dist/**"])
    job_id = (await submitted.json())["jobId"]
    worker = await api.register()
    job = await api.claim(worker)
    assert (await send(api, worker, job, artifacts)).status == 201

    from_other = [await other.call("GET", upload["url"], token=admin),
                  await other.call("GET", f"/api/jobs/artifacts?jobId={job_id}", token=admin),
                  await fetch(other, worker, job, [entry("", blob)["sha256"]])]

    assert [response.status for response in from_other] == [200, 200, 200]
    assert [await response.read() for response in from_other] == [project, artifacts, blob]
    assert from_other[0].headers["Content-Length"] == str(len(project))
    for data_dir in (config.data_path, other.client.app[dispatch.CONFIG].data_path):
        for path in (p for p in data_dir.rglob("*") if p.is_file()):
            held = path.read_bytes()
            assert not any(content[1000:1100] in held for content in (project, blob, artifacts)), path


async def test_an_upload_its_client_abandons_leaves_nothing_behind(make_client, config):
    api = Api(await make_client(request_timeout=2.0))
    token = await api.admin()
    head = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.zip"\r\n'
            b"Content-Type: application/zip\r\n\r\n")
    reader, writer = await asyncio.open_connection(api.client.host, api.client.port)
    writer.write(f"POST /api/files/upload HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n"
                 f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {len(head) + 10 * ROW}\r\n\r\n"
                 .encode() + head + os.urandom(3 * ROW))
    await writer.drain()
    await eventually(lambda: _stored_any(config))  # some of it is stored: partial rows, or a partial file

    writer.close()  # gone half way

    await eventually(lambda: _stored_none(config))
    assert await run_sql(config, "SELECT COUNT(*) FROM files") == [(0,)]


async def _stored_any(config) -> bool:
    return bool(await stored(config))


async def _stored_none(config) -> bool:
    return not await stored(config)


async def test_a_content_put_again_while_it_is_read_is_never_read_mixed(client, config):
    contents = client.app[dispatch.CONTENTS]
    key, first, second = "artifacts/job-x.1.zip", os.urandom(2 * ROW + 1), os.urandom(2 * ROW + 1)

    async def keep(content: bytes) -> None:
        receiver = contents.receiver(key, len(content), lambda: dispatch.DispatchError("too large"))
        await receiver.write(content)
        await contents.keep([receiver])
        await receiver.discard()

    await keep(first)
    reading = contents.read(key, len(first))
    pieces = [await anext(reading)]
    await keep(second)
    try:
        pieces += [piece async for piece in reading]
    except dispatch.ContentGone:
        pieces = None

    if config.database_url:
        assert pieces is None  # its rows changed under the reader: it stops
    else:
        assert b"".join(pieces) == first  # the reader's open file is the first one still


@postgresql_only
async def test_partial_contents_a_day_old_are_removed_at_start_and_newer_ones_kept(
        api, config, aiohttp_client, clock, tmp_path):
    await api.admin()  # the first server is up
    dead = f"partial/{clock.iso(-25 * 3600)}/{'0' * 32}"
    arriving = f"partial/{clock.iso(-3600)}/{'1' * 32}"
    await run_sql(config, f"INSERT INTO file_chunks (key, n, data) VALUES ('{dead}', 0, '\\x00'), ('{arriving}', 0, '')")

    await aiohttp_client(dispatch.create_app(dataclasses.replace(config, data_dir=str(tmp_path / "other")), clock=clock))

    assert await stored(config) == [arriving]
