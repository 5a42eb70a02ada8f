"""Artifacts: the worker holding an attempt sends a zip (POST /api/jobs/artifacts) before its result;
the job's owner and admins download it (GET /api/jobs/artifacts); past DISPATCH_MAX_ARTIFACT_MB the
job still gets its result and says why it has none; artifacts expire with their job."""

from __future__ import annotations

import hashlib
import io

import aiohttp
import pytest

import dispatch
from conftest import Api, make_zip, stored


def form(job: dict | None, content: bytes, *, attempt=None, file_first: bool = False) -> aiohttp.FormData:
    data = aiohttp.FormData()
    fields = [] if job is None else [("jobId", job["jobId"]), ("attempt", str(attempt or job["attempt"]))]
    file = ("file", io.BytesIO(content))
    for name, value in ([file] + fields if file_first else fields + [file]):
        if name == "file":
            data.add_field("file", value, filename="artifacts.zip", content_type="application/zip")
        else:
            data.add_field(name, value)
    return data


async def send(api: Api, worker: str, job: dict, content: bytes, **kwargs):
    return await api.call("POST", "/api/jobs/artifacts", worker=worker, data=form(job, content, **kwargs))


async def result(api: Api, worker: str, job: dict, exit_code: int = 0, **fields):
    return await api.call("POST", "/api/jobs/submit-result", worker=worker,
                          json={"jobId": job["jobId"], "attempt": job["attempt"], "exitCode": exit_code, **fields})


async def running_job(api: Api, **fields) -> tuple[str, str, dict]:
    token, _ = await api.new_user()
    await api.submit(token, artifacts=["dist/**"], **fields)
    worker = await api.register()
    return token, worker, await api.claim(worker)


ZIP = make_zip({"dist/app.bin": b"\x00" * 100, "dist/readme.txt": "built", "report.xml": "<ok/>"})


async def test_the_holder_sends_artifacts_and_the_owner_downloads_them(api):
    token, worker, job = await running_job(api)

    sent = await send(api, worker, job, ZIP)
    assert sent.status == 201, await sent.text()
    assert (await result(api, worker, job)).status == 200

    status = await api.status(token, job["jobId"])
    assert status["status"] == "completed" and status["error"] is None
    assert status["artifacts"] == {"url": f"/api/jobs/artifacts?jobId={job['jobId']}", "size": len(ZIP),
                                   "files": 3, "sha256": hashlib.sha256(ZIP).hexdigest()}
    download = await api.call("GET", status["artifacts"]["url"], token=token)
    assert download.status == 200
    assert download.headers["Content-Type"] == "application/zip"
    assert f'filename="{job["jobId"]}-artifacts.zip"' in download.headers["Content-Disposition"]
    assert await download.read() == ZIP


async def test_only_the_holder_of_the_attempt_may_send_artifacts(api):
    token, worker, job = await running_job(api)
    other = await api.register("worker-b")

    assert (await send(api, other, job, ZIP)).status == 409
    assert (await send(api, worker, job, ZIP, attempt=job["attempt"] + 1)).status == 409
    as_user = await api.call("POST", "/api/jobs/artifacts", token=token, data=form(job, ZIP))
    assert as_user.status == 403
    await api.call("POST", "/api/jobs/cancel", token=token, json={"jobId": job["jobId"]})
    assert (await send(api, worker, job, ZIP)).status == 409  # cancelled: no longer its own


async def test_the_fields_must_come_before_the_file_and_the_file_must_be_a_zip(api, config):
    _, worker, job = await running_job(api)

    late = await send(api, worker, job, ZIP, file_first=True)
    assert late.status == 400 and "jobId is required" in (await late.json())["message"]
    not_zip = await send(api, worker, job, b"just text")
    assert not_zip.status == 400 and (await not_zip.json())["code"] == "NOT_A_ZIP"
    nothing = await api.call("POST", "/api/jobs/artifacts", worker=worker, data=b"x")
    assert nothing.status == 400
    assert await stored(config) == []


async def test_artifacts_past_the_cap_are_refused_and_the_result_says_why(make_client):
    api = Api(await make_client(max_artifact_mb=1))
    token, worker, job = await running_job(api)
    big = make_zip({"dist/big.bin": b"\x00" * 10})[:0] + b"x" * (1024 * 1024 + 10)

    refused = await send(api, worker, job, big)
    assert refused.status == 413 and (await refused.json())["code"] == "ARTIFACTS_TOO_LARGE"
    assert (await result(api, worker, job)).status == 200

    status = await api.status(token, job["jobId"])
    assert status["status"] == "completed" and status["exitCode"] == 0
    assert status["artifacts"] is None and "artifacts too big" in status["error"]
    download = await api.call("GET", f"/api/jobs/artifacts?jobId={job['jobId']}", token=token)
    assert download.status == 404 and "too big" in (await download.json())["message"]


async def test_a_failed_job_says_both_why_it_failed_and_that_its_artifacts_were_too_big(make_client):
    api = Api(await make_client(max_artifact_mb=1))
    token, worker, job = await running_job(api, artifactsWhen="always")
    await send(api, worker, job, b"x" * (1024 * 1024 + 10))
    await result(api, worker, job, 2)
    status = await api.status(token, job["jobId"])
    assert status["status"] == "failed"
    assert status["error"].startswith("exited with code 2; artifacts too big")


@pytest.mark.parametrize("caller, expected", [("owner", 200), ("admin", 200), ("other", 403), ("worker", 403)])
async def test_artifacts_are_for_the_owner_and_admins(api, caller, expected):
    token, worker, job = await running_job(api)
    await send(api, worker, job, ZIP)
    other, _ = await api.new_user("other@example.com")
    credentials = {"owner": {"token": token}, "admin": {"token": await api.admin()}, "other": {"token": other},
                   "worker": {"worker": worker}}[caller]
    api.forget_cookies()
    response = await api.call("GET", f"/api/jobs/artifacts?jobId={job['jobId']}", **credentials)
    assert response.status == expected


async def test_a_job_without_artifacts_answers_404_and_an_unknown_job_too(api):
    token, worker, job = await running_job(api)
    none_yet = await api.call("GET", f"/api/jobs/artifacts?jobId={job['jobId']}", token=token)
    assert none_yet.status == 404 and (await none_yet.json())["code"] == "NO_ARTIFACTS"
    unknown = await api.call("GET", "/api/jobs/artifacts?jobId=job-nope", token=token)
    assert unknown.status == 404
    no_id = await api.call("GET", "/api/jobs/artifacts", token=token)
    assert no_id.status == 400


async def test_a_new_attempt_does_not_show_the_artifacts_of_the_one_before(api, config):
    token, _ = await api.new_user()
    job_id = await api.submit(token, retries=1, artifacts=["dist/**"], artifactsWhen="always")
    worker = await api.register()
    first = await api.claim(worker)
    await send(api, worker, first, ZIP)
    await result(api, worker, first, 1)  # retried

    second = await api.claim(worker)
    assert second["attempt"] == first["attempt"] + 1
    assert (await api.status(token, job_id))["artifacts"] is None
    again = make_zip({"dist/second.txt": "2"})
    await send(api, worker, second, again)
    assert await stored(config) == [f"artifacts/{job_id}.{second['attempt']}.zip"]  # the first is gone
    assert (await api.status(token, job_id))["artifacts"]["files"] == 1


async def test_artifacts_expire_with_their_job(client, api, clock, config):
    token, worker, job = await running_job(api)
    await send(api, worker, job, ZIP)
    await result(api, worker, job)
    assert len(await stored(config)) == 1

    clock.advance(config.job_retention_days * 86400 + 60)
    await dispatch._sweep_storage(client.app)

    assert await stored(config) == []
    assert (await api.call("GET", f"/api/jobs/status?jobId={job['jobId']}", token=token)).status == 404


async def test_a_state_event_carries_the_artifacts(api):
    token, worker, job = await running_job(api)
    async with api.client.ws_connect(f"/api/jobs/stream?jobId={job['jobId']}",
                                     headers={"Authorization": f"Bearer {token}"}) as ws:
        await send(api, worker, job, ZIP)
        await result(api, worker, job)
        event = await ws.receive_json(timeout=5)
    assert event["type"] == "job.completed" and event["artifacts"]["files"] == 3


def test_the_entry_count_comes_from_the_zip_end_record(tmp_path):
    import zipfile

    plain = tmp_path / "plain.zip"
    plain.write_bytes(make_zip({f"f{i}": "x" for i in range(7)}))
    forced = tmp_path / "zip64.zip"
    with zipfile.ZipFile(forced, "w") as archive:
        for i in range(3):
            with archive.open(f"f{i}", "w", force_zip64=True) as f:
                f.write(b"x")
    text = tmp_path / "text.zip"
    text.write_bytes(b"not a zip at all")
    tails = [(p.read_bytes()[-dispatch.ZIP_TAIL_BYTES:], p.stat().st_size) for p in (plain, forced, text)]
    assert [dispatch._zip_entry_count(*tail) for tail in tails] == [7, 3, None]
