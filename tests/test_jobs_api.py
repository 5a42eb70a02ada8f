"""Jobs: submit and its validation, get-job (order, tags, long-poll, races), output streaming,
results, status and the list."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import pytest

from conftest import ISO_MS, Api, make_zip




async def total_jobs(api: Api) -> int:
    response = await api.call("GET", "/api/jobs/list", token=await api.admin())
    return (await response.json())["total"]


async def job_ids(api: Api, **params) -> list[str]:
    response = await api.call("GET", "/api/jobs/list", token=await api.admin(), params=params)
    assert response.status == 200, await response.text()
    return [j["jobId"] for j in (await response.json())["jobs"]]


async def output(api: Api, worker: str, job_id: str, data: str, stream: str = "stdout"):
    return await api.call("POST", "/api/jobs/stream-output", worker=worker,
                          json={"jobId": job_id, "data": data, "type": stream})


async def result(api: Api, worker: str, job_id: str, exit_code: int = 0, worker_id: str = "worker-001",
                 params: dict | None = None, **fields):
    return await api.call("POST", "/api/jobs/submit-result", worker=worker, params=params,
                          json={"jobId": job_id, "workerId": worker_id, "exitCode": exit_code, **fields})


async def running_job(api: Api, command: str = "npm test") -> tuple[str, str, str]:
    """(admin token, worker token, job id) with the job claimed by worker-001."""
    admin = await api.admin()
    worker = await api.register("worker-001")
    job_id = await api.submit(admin, command)
    assert (await api.claim(worker))["jobId"] == job_id
    return admin, worker, job_id


# -- submit ---------------------------------------------------------------------


async def test_submit_returns_201_queued_with_iso_time_and_an_estimate(api):
    await api.register()  # with no worker online the estimate is null (see test_scheduling.py)
    before = dt.datetime.now(dt.timezone.utc)

    response = await api.call("POST", "/api/jobs/submit", token=await api.admin(),
                              json={"command": "npm test", "workingDirectory": "project", "timeout": 600,
                                    "priority": "normal"})

    body = await response.json()
    assert response.status == 201
    assert (body["success"], body["status"]) == (True, "queued")
    assert isinstance(body["jobId"], str) and body["jobId"]
    assert ISO_MS.match(body["createdAt"]), body["createdAt"]
    created = dt.datetime.fromisoformat(body["createdAt"].replace("Z", "+00:00"))
    assert before - dt.timedelta(seconds=1) <= created <= before + dt.timedelta(seconds=5)
    assert type(body["estimatedWaitTime"]) is int and body["estimatedWaitTime"] >= 0
    job = await api.status(await api.admin(), body["jobId"])
    assert (job["status"], job["createdAt"], job["timeout"], job["workingDirectory"]) == (
        "queued", body["createdAt"], 600, "project")


async def test_submit_defaults_timeout_to_600_and_priority_to_normal(api):
    job_id = await api.submit(await api.admin(), "make")

    job = await api.status(await api.admin(), job_id)

    assert (job["timeout"], job["priority"]) == (600, "normal")


async def test_a_plain_user_may_submit_but_a_worker_and_nobody_may_not(api):
    user, _ = await api.new_user()
    worker = await api.register()
    api.forget_cookies()

    as_user = await api.call("POST", "/api/jobs/submit", token=user, json={"command": "id"})
    as_worker = await api.call("POST", "/api/jobs/submit", worker=worker, json={"command": "id"})
    anonymous = await api.call("POST", "/api/jobs/submit", json={"command": "id"})

    assert (as_user.status, as_worker.status, anonymous.status) == (201, 403, 401)
    assert await total_jobs(api) == 1


@pytest.mark.parametrize("body, field", [
    ({}, "command"),
    ({"command": ""}, "command"),
    ({"command": "   "}, "command"),
    ({"command": None}, "command"),
    ({"command": 42}, "command"),
    ({"command": ["ls"]}, "command"),
    ({"command": "id", "timeout": 0}, "timeout"),
    ({"command": "id", "timeout": -1}, "timeout"),
    ({"command": "id", "timeout": "x"}, "timeout"),
    ({"command": "id", "timeout": "600"}, "timeout"),
    ({"command": "id", "timeout": True}, "timeout"),
    ({"command": "id", "priority": "urgent"}, "priority"),
    ({"command": "id", "priority": "HIGH"}, "priority"),
    ({"command": "id", "priority": 2}, "priority"),
    ({"command": "id", "fileUrl": "/uploads/project.zip"}, "fileUrl"),
    ({"command": "id", "fileUrl": "/etc/passwd"}, "fileUrl"),
    ({"command": "id", "fileUrl": "file:///etc/passwd"}, "fileUrl"),
    ({"command": "id", "fileUrl": "/uploads/file-" + "0" * 32 + "/project.zip"}, "fileUrl"),
    ({"command": "id", "fileUrl": 7}, "fileUrl"),
    ({"command": "id", "workingDirectory": "/etc"}, "workingDirectory"),
    ({"command": "id", "workingDirectory": "\\Windows"}, "workingDirectory"),
    ({"command": "id", "workingDirectory": "C:\\Windows"}, "workingDirectory"),
    ({"command": "id", "workingDirectory": ".."}, "workingDirectory"),
    ({"command": "id", "workingDirectory": "src/../../x"}, "workingDirectory"),
    ({"command": "id", "workingDirectory": "src\\..\\..\\x"}, "workingDirectory"),
    ({"command": "id", "workingDirectory": 5}, "workingDirectory"),
    ({"command": "id", "tags": "gpu"}, "tags"),
    ({"command": "id", "tags": [1, 2]}, "tags"),
    ({"command": "id", "tags": ["gpu", None]}, "tags"),
    ({"command": "id", "tags": [""]}, "tags"),
    ({"command": "id", "tags": {"gpu": True}}, "tags"),
])
async def test_bad_submit_is_400_naming_the_field_and_changes_nothing(api, body, field):
    admin = await api.admin()
    await api.submit(admin, "already there")

    response = await api.call("POST", "/api/jobs/submit", token=admin, json=body)

    error = await response.json()
    assert response.status == 400
    assert error["error"] == "Invalid request"
    assert field in error["message"]
    assert error["code"]
    assert await total_jobs(api) == 1


@pytest.mark.parametrize("raw", [b"{\"command\": ", b"not json at all", b"[\"echo\"]", b"\"echo\"", b"null",
                                 b"\xff\xfe\x00"])
async def test_malformed_submit_body_is_400_never_500(api, raw):
    admin = await api.admin()

    response = await api.call("POST", "/api/jobs/submit", token=admin, data=raw,
                              headers={"Content-Type": "application/json"})

    assert response.status == 400
    assert (await response.json())["error"] == "Invalid request"
    assert await total_jobs(api) == 0


async def test_file_url_from_an_upload_is_accepted_relative_or_absolute_on_this_host(api):
    admin = await api.admin()
    upload = await api.upload(admin, make_zip({"a.txt": "a"}))
    absolute = str(api.client.make_url(upload["url"]))

    relative_job = await api.submit(admin, "ls", fileUrl=upload["url"])
    absolute_job = await api.submit(admin, "ls", fileUrl=absolute)

    assert (await api.status(admin, relative_job))["fileUrl"] == upload["url"]
    assert (await api.status(admin, absolute_job))["fileUrl"] == upload["url"]


@pytest.mark.parametrize("shape", ["foreign-host", "foreign-scheme", "wrong-name", "with-query"])
async def test_file_url_that_is_not_one_this_server_handed_out_is_400(api, shape):
    admin = await api.admin()
    upload = await api.upload(admin, make_zip({"a.txt": "a"}))
    url = {
        "foreign-host": "http://evil.example" + upload["url"],
        "foreign-scheme": "ftp://" + api.client.host + f":{api.client.port}" + upload["url"],
        "wrong-name": upload["url"].rsplit("/", 1)[0] + "/other.zip",
        "with-query": upload["url"] + "?x=1",
    }[shape]

    response = await api.call("POST", "/api/jobs/submit", token=admin, json={"command": "ls", "fileUrl": url})

    assert response.status == 400, url
    assert "fileUrl" in (await response.json())["message"]
    assert await total_jobs(api) == 0


async def test_file_url_of_another_users_file_is_400(api):
    alice, _ = await api.new_user("alice@example.com")
    bob, _ = await api.new_user("bob@example.com")
    upload = await api.upload(alice, make_zip({"secret.txt": "alice's"}))

    response = await api.call("POST", "/api/jobs/submit", token=bob, json={"command": "ls", "fileUrl": upload["url"]})

    assert response.status == 400
    assert "fileUrl" in (await response.json())["message"]
    assert await total_jobs(api) == 0


# -- get-job --------------------------------------------------------------------


async def test_get_job_hands_out_by_priority_then_oldest_first(api):
    admin = await api.admin()
    low = await api.submit(admin, "low", priority="low")
    normal_1 = await api.submit(admin, "normal 1")
    high = await api.submit(admin, "high", priority="high")
    normal_2 = await api.submit(admin, "normal 2", priority="normal")
    high_2 = await api.submit(admin, "high 2", priority="high")
    worker = await api.register()

    order = [(await api.claim(worker))["jobId"] for _ in range(5)]

    assert order == [high, high_2, normal_1, normal_2, low]
    assert await api.claim(worker) is None


async def test_get_job_answers_the_contract_shape(api):
    admin, worker, job_id = await running_job(api)
    await api.submit(admin, "make", workingDirectory="project", timeout=90)

    response = await api.call("GET", "/api/jobs/get-job", worker=worker)

    body = await response.json()
    assert response.status == 200
    assert body["success"] is True
    job = body["job"]
    assert (job["command"], job["fileUrl"], job["workingDirectory"], job["timeout"]) == ("make", None, "project", 90)
    assert job["jobId"] != job_id


async def test_get_job_matches_tags_all_of_which_the_worker_must_have(api):
    admin = await api.admin()
    gpu_job = await api.submit(admin, "train", tags=["gpu"])
    windows_gpu_job = await api.submit(admin, "build", tags=["gpu", "windows"])
    plain = await api.register("plain")
    linux_gpu = await api.register("linux-gpu", tags=["linux", "gpu"])
    windows_gpu = await api.register("windows-gpu", tags=["windows", "gpu", "big"])

    assert await api.claim(plain) is None
    assert (await api.claim(linux_gpu))["jobId"] == gpu_job
    assert await api.claim(linux_gpu) is None
    assert (await api.claim(windows_gpu))["jobId"] == windows_gpu_job
    untagged = await api.submit(admin, "anyone")
    assert (await api.claim(plain))["jobId"] == untagged


async def test_get_job_is_204_with_no_body_when_the_queue_is_empty(api):
    worker = await api.register()

    response = await api.call("GET", "/api/jobs/get-job", worker=worker)

    assert response.status == 204
    assert await response.read() == b""


@pytest.mark.parametrize("credentials, expected", [({}, 401), ({"worker": "bogus"}, 401), ({"token": "ADMIN"}, 403)])
async def test_get_job_is_for_workers_only(api, credentials, expected):
    admin = await api.admin()
    job_id = await api.submit(admin)
    if credentials.get("token") == "ADMIN":
        credentials = {"token": admin}
    api.forget_cookies()

    response = await api.call("GET", "/api/jobs/get-job", **credentials)

    assert response.status == expected
    assert (await api.status(admin, job_id))["status"] == "queued"


async def test_get_job_makes_the_file_url_absolute_from_the_request_host(api):
    admin = await api.admin()
    upload = await api.upload(admin, make_zip({"package.json": "{}"}))
    await api.submit(admin, "npm test", fileUrl=upload["url"])
    worker = await api.register()

    job = await api.claim(worker)

    assert job["fileUrl"] == f"http://{api.client.host}:{api.client.port}{upload['url']}"


async def test_get_job_builds_file_urls_from_the_host_header(api):
    admin = await api.admin()
    upload = await api.upload(admin, make_zip({"package.json": "{}"}))
    await api.submit(admin, "npm test", fileUrl=upload["url"])
    worker = await api.register()

    response = await api.call("GET", "/api/jobs/get-job", worker=worker, headers={"Host": "lanbox:3000"})

    assert (await response.json())["job"]["fileUrl"] == f"http://lanbox:3000{upload['url']}"


async def test_long_poll_wakes_the_moment_a_job_is_submitted(api):
    admin = await api.admin()
    worker = await api.register()
    started = time.monotonic()
    waiting = asyncio.ensure_future(api.claim(worker, wait=2))
    await asyncio.sleep(0.3)
    assert not waiting.done()  # it really is holding the request

    submitted = time.monotonic()
    job_id = await api.submit(admin, "make")
    job = await waiting

    assert job is not None and job["jobId"] == job_id
    assert time.monotonic() - submitted < 0.5
    assert time.monotonic() - started < 1.5


async def test_a_result_asking_for_the_next_job_long_polls_for_it_the_same_way(api):
    admin, worker, job_id = await running_job(api)
    waiting = asyncio.ensure_future(result(api, worker, job_id, 0, params={"next": "1", "wait": "2"}))
    await asyncio.sleep(0.3)
    assert not waiting.done()  # the result is saved, the answer waits for a job
    assert (await api.status(admin, job_id))["status"] == "completed"

    submitted = time.monotonic()
    next_id = await api.submit(admin, "make")
    answer = await (await waiting).json()

    assert (answer["jobId"], answer["next"]["jobId"]) == (job_id, next_id)
    assert time.monotonic() - submitted < 0.5


@pytest.mark.slow  # waits out real time (a long poll, a timeout, an interval)
async def test_long_poll_answers_204_after_the_wait_when_nothing_comes(api):
    worker = await api.register()
    await api.submit(await api.admin(), "needs a gpu", tags=["gpu"])  # a job, but not for this worker

    started = time.monotonic()
    response = await api.call("GET", "/api/jobs/get-job", worker=worker, params={"wait": "1"})
    elapsed = time.monotonic() - started

    assert response.status == 204
    assert 0.9 <= elapsed < 1.8


@pytest.mark.parametrize("wait", ["-1", "x", "61", "nan"])
async def test_bad_wait_is_400(api, wait):
    worker = await api.register()

    response = await api.call("GET", "/api/jobs/get-job", worker=worker, params={"wait": wait})

    assert response.status == 400
    assert "wait" in (await response.json())["message"]


async def test_ten_workers_racing_for_one_job_exactly_one_gets_it(api):
    admin = await api.admin()
    workers = [await api.register(f"w{n}") for n in range(10)]
    job_id = await api.submit(admin, "only once")

    responses = await asyncio.gather(*(api.call("GET", "/api/jobs/get-job", worker=w) for w in workers))

    assert sorted(r.status for r in responses) == [200] + [204] * 9
    winner = next(i for i, r in enumerate(responses) if r.status == 200)
    assert (await responses[winner].json())["job"]["jobId"] == job_id
    job = await api.status(admin, job_id)
    assert (job["status"], job["workerId"], job["attempts"]) == ("running", f"w{winner}", 1)


@pytest.mark.slow  # waits out real time (a long poll, a timeout, an interval)
async def test_ten_long_polling_workers_woken_by_one_job_exactly_one_gets_it(api):
    admin = await api.admin()
    workers = [await api.register(f"w{n}") for n in range(10)]
    polls = [asyncio.ensure_future(api.call("GET", "/api/jobs/get-job", worker=w, params={"wait": "1"}))
             for w in workers]
    await asyncio.sleep(0.2)

    job_id = await api.submit(admin, "only once")
    responses = await asyncio.gather(*polls)

    assert sorted(r.status for r in responses) == [200] + [204] * 9
    assert [(await r.json())["job"]["jobId"] for r in responses if r.status == 200] == [job_id]
    assert (await api.status(admin, job_id))["attempts"] == 1


# -- stream-output --------------------------------------------------------------


async def test_stream_output_appends_in_order(api):
    admin, worker, job_id = await running_job(api)

    for n in range(20):
        response = await output(api, worker, job_id, f"line {n}\n")
        assert response.status == 200
        assert await response.json() == {"success": True, "received": True}
    await output(api, worker, job_id, "warning\n", stream="stderr")

    job = await api.status(admin, job_id)
    assert job["stdout"] == "".join(f"line {n}\n" for n in range(20))
    assert job["stderr"] == "warning\n"
    assert job["status"] == "running"


async def test_stream_output_from_another_worker_is_409(api):
    admin, worker, job_id = await running_job(api)
    other = await api.register("worker-002")

    response = await output(api, other, job_id, "forged\n")

    assert response.status == 409
    assert (await response.json())["error"] == "Conflict"
    assert (await api.status(admin, job_id))["stdout"] == ""


async def test_stream_output_for_a_queued_job_is_409(api):
    admin = await api.admin()
    worker = await api.register()
    job_id = await api.submit(admin)

    response = await output(api, worker, job_id, "early\n")

    assert response.status == 409
    assert (await api.status(admin, job_id))["stdout"] == ""


async def test_stream_output_by_a_user_is_403_and_anonymous_401(api):
    admin, _worker, job_id = await running_job(api)
    api.forget_cookies()

    as_user = await api.call("POST", "/api/jobs/stream-output", token=admin,
                             json={"jobId": job_id, "data": "x", "type": "stdout"})
    anonymous = await api.call("POST", "/api/jobs/stream-output", json={"jobId": job_id, "data": "x", "type": "stdout"})

    assert (as_user.status, anonymous.status) == (403, 401)
    assert (await api.status(admin, job_id))["stdout"] == ""


async def test_stream_output_for_an_unknown_job_is_404(api):
    worker = await api.register()

    response = await output(api, worker, "job-does-not-exist", "x")

    assert response.status == 404
    assert (await response.json())["error"] == "Not found"


@pytest.mark.parametrize("body, field", [
    ({"type": "stdin"}, "type"), ({"type": "STDOUT"}, "type"), ({"type": 1}, "type"),
    ({"data": None}, "data"), ({"data": 5}, "data"), ({"jobId": None}, "jobId"),
])
async def test_stream_output_with_a_bad_field_is_400(api, body, field):
    admin, worker, job_id = await running_job(api)

    response = await api.call("POST", "/api/jobs/stream-output", worker=worker,
                              json={"jobId": job_id, "data": "x\n", "type": "stdout", **body})

    assert response.status == 400
    assert field in (await response.json())["message"]
    assert (await api.status(admin, job_id))["stdout"] == ""


# -- submit-result --------------------------------------------------------------


async def test_exit_zero_completes_the_job(api):
    admin, worker, job_id = await running_job(api)

    response = await result(api, worker, job_id, 0, stdout="tests passed\n", stderr="")

    assert response.status == 200
    assert await response.json() == {"success": True, "message": "Result saved", "jobId": job_id}
    job = await api.status(admin, job_id)
    assert (job["status"], job["exitCode"], job["stdout"], job["workerId"]) == (
        "completed", 0, "tests passed\n", "worker-001")
    assert ISO_MS.match(job["startedAt"])
    listed = (await (await api.call("GET", "/api/jobs/list", token=admin)).json())["jobs"][0]
    assert ISO_MS.match(listed["completedAt"]) and listed["completedAt"] >= job["startedAt"]


@pytest.mark.parametrize("exit_code", [1, 2, 124, -9, 255])
async def test_non_zero_exit_fails_the_job_with_its_exit_code(api, exit_code):
    admin, worker, job_id = await running_job(api)

    response = await result(api, worker, job_id, exit_code, stderr="boom\n")

    assert response.status == 200
    job = await api.status(admin, job_id)
    assert (job["status"], job["exitCode"], job["stderr"]) == ("failed", exit_code, "boom\n")


async def test_a_second_result_is_409_and_changes_nothing(api):
    admin, worker, job_id = await running_job(api)
    assert (await result(api, worker, job_id, 0, stdout="first\n")).status == 200
    before = await api.status(admin, job_id)

    second = await result(api, worker, job_id, 1, stdout="second\n", stderr="late\n")
    late_output = await output(api, worker, job_id, "more\n")

    assert (second.status, late_output.status) == (409, 409)
    assert await api.status(admin, job_id) == before
    assert (before["status"], before["exitCode"], before["stdout"]) == ("completed", 0, "first\n")


async def test_two_results_sent_at_once_one_wins_and_the_loser_changes_nothing(api):
    """An agent that retries a result it thinks was lost sends it twice, concurrently."""
    admin, worker, job_id = await running_job(api)
    await output(api, worker, job_id, "streamed\n")

    first, second = await asyncio.gather(
        result(api, worker, job_id, 0, stdout="from the first\n", stderr="e1\n"),
        result(api, worker, job_id, 1, stdout="from the second\n", stderr="e2\n"))

    assert sorted([first.status, second.status]) == [200, 409]
    job = await api.status(admin, job_id)
    if first.status == 200:
        expected = ("completed", 0, "streamed\nfrom the first\n", "e1\n")
    else:
        expected = ("failed", 1, "streamed\nfrom the second\n", "e2\n")
    assert (job["status"], job["exitCode"], job["stdout"], job["stderr"]) == expected


async def test_result_from_a_worker_that_does_not_hold_the_job_is_409(api):
    admin, worker, job_id = await running_job(api)
    other = await api.register("worker-002")

    response = await result(api, other, job_id, 0, worker_id="worker-002", stdout="forged\n")

    assert response.status == 409
    job = await api.status(admin, job_id)
    assert (job["status"], job["exitCode"], job["stdout"]) == ("running", None, "")
    assert (await result(api, worker, job_id, 0)).status == 200


async def test_result_naming_another_worker_id_is_refused(api):
    admin, worker, job_id = await running_job(api)
    await api.register("worker-002")

    response = await result(api, worker, job_id, 0, worker_id="worker-002")

    assert response.status in (403, 409)
    assert (await api.status(admin, job_id))["status"] == "running"


async def test_result_for_an_unknown_job_is_404(api):
    worker = await api.register()

    response = await result(api, worker, "job-does-not-exist", 0)

    assert response.status == 404


@pytest.mark.parametrize("exit_code", [None, "0", 1.5, True])
async def test_result_without_an_integer_exit_code_is_400(api, exit_code):
    admin, worker, job_id = await running_job(api)

    response = await result(api, worker, job_id, exit_code)

    assert response.status == 400
    assert "exitCode" in (await response.json())["message"]
    assert (await api.status(admin, job_id))["status"] == "running"


async def test_result_stdout_is_appended_after_the_streamed_output(api):
    admin, worker, job_id = await running_job(api)
    await output(api, worker, job_id, "streamed 1\n")
    await output(api, worker, job_id, "streamed err\n", stream="stderr")
    await output(api, worker, job_id, "streamed 2\n")

    await result(api, worker, job_id, 0, stdout="final\n", stderr="final err\n")

    job = await api.status(admin, job_id)
    assert job["stdout"] == "streamed 1\nstreamed 2\nfinal\n"
    assert job["stderr"] == "streamed err\nfinal err\n"


# -- status ---------------------------------------------------------------------


async def test_status_of_a_running_job(api):
    admin, worker, job_id = await running_job(api)
    await api.call("POST", "/api/jobs/stream-output", worker=worker,
                   json={"jobId": job_id, "data": "Running tests...\n", "type": "stdout", "progress": 45})

    response = await api.call("GET", "/api/jobs/status", token=admin, params={"jobId": job_id})

    body = await response.json()
    assert response.status == 200
    job = body["job"]
    assert {"jobId", "status", "workerId", "createdAt", "startedAt", "stdout", "stderr", "progress",
            "exitCode"} <= set(job)
    assert (job["jobId"], job["status"], job["workerId"], job["stdout"], job["stderr"], job["progress"],
            job["exitCode"]) == (job_id, "running", "worker-001", "Running tests...\n", "", 45, None)


async def test_status_of_an_unknown_job_is_404(api):
    response = await api.call("GET", "/api/jobs/status", token=await api.admin(), params={"jobId": "job-nope"})

    body = await response.json()
    assert response.status == 404
    assert body["error"] == "Not found"
    assert body["code"]


async def test_status_without_a_job_id_is_400(api):
    admin = await api.admin()

    missing = await api.call("GET", "/api/jobs/status", token=admin)
    empty = await api.call("GET", "/api/jobs/status", token=admin, params={"jobId": ""})

    assert (missing.status, empty.status) == (400, 400)
    assert "jobId" in (await missing.json())["message"]


async def test_a_user_may_read_status_but_nobody_and_a_worker_may_not(api):
    admin = await api.admin()
    job_id = await api.submit(admin)
    user, _ = await api.new_user()
    worker = await api.register()
    api.forget_cookies()

    statuses = [(await api.call("GET", "/api/jobs/status", params={"jobId": job_id}, **creds)).status
                for creds in ({"token": user}, {"worker": worker}, {})]

    assert statuses == [200, 403, 401]


# -- list -----------------------------------------------------------------------


async def test_list_shows_the_contract_fields(api):
    admin, worker, job_id = await running_job(api)
    await result(api, worker, job_id, 0)

    response = await api.call("GET", "/api/jobs/list", token=admin)

    body = await response.json()
    assert (body["success"], body["total"], body["limit"], body["offset"], body["hasMore"]) == (True, 1, 100, 0, False)
    job = body["jobs"][0]
    assert (job["jobId"], job["command"], job["status"], job["workerId"], job["exitCode"]) == (
        job_id, "npm test", "completed", "worker-001", 0)
    assert ISO_MS.match(job["createdAt"]) and ISO_MS.match(job["completedAt"])


async def test_list_filters_by_status_and_worker(api):
    admin = await api.admin()
    w1, w2 = await api.register("w1"), await api.register("w2")
    done = await api.submit(admin, "done")
    broken = await api.submit(admin, "broken")
    running = await api.submit(admin, "running")
    queued = await api.submit(admin, "queued")
    assert (await api.claim(w1))["jobId"] == done
    assert (await api.claim(w2))["jobId"] == broken
    assert (await api.claim(w1))["jobId"] == running
    await result(api, w1, done, 0, worker_id="w1")
    await result(api, w2, broken, 2, worker_id="w2")

    assert await job_ids(api, status="completed") == [done]
    assert await job_ids(api, status="failed") == [broken]
    assert await job_ids(api, status="running") == [running]
    assert await job_ids(api, status="queued") == [queued]
    assert await job_ids(api, workerId="w1") == [done, running]
    assert await job_ids(api, workerId="w1", status="running") == [running]
    assert await job_ids(api, workerId="nobody") == []
    response = await api.call("GET", "/api/jobs/list", token=admin, params={"status": "done"})
    assert response.status == 400


async def test_list_pages_with_total_limit_offset_has_more(api):
    admin = await api.admin()
    ids = [await api.submit(admin, f"job {n}") for n in range(5)]

    pages = []
    for offset in (0, 2, 4):
        response = await api.call("GET", "/api/jobs/list", token=admin, params={"limit": "2", "offset": str(offset)})
        pages.append(await response.json())

    assert [j["jobId"] for p in pages for j in p["jobs"]] == ids
    assert [(p["total"], p["limit"], p["offset"], p["hasMore"], len(p["jobs"])) for p in pages] == [
        (5, 2, 0, True, 2), (5, 2, 2, True, 2), (5, 2, 4, False, 1)]


@pytest.mark.parametrize("params", [{"sort": "command"}, {"sort": "seq"}, {"sort": "created_at"},
                                    {"sort": "createdAt; DROP TABLE jobs"}, {"sort": "--createdAt"},
                                    {"limit": "0"}, {"limit": "1001"}, {"limit": "x"}, {"offset": "-1"}])
async def test_bad_sort_or_paging_is_400(api, params):
    admin = await api.admin()
    await api.submit(admin)

    response = await api.call("GET", "/api/jobs/list", token=admin, params=params)

    assert response.status == 400
    assert next(iter(params)) in (await response.json())["message"]
    assert await total_jobs(api) == 1


async def test_minus_created_at_is_exactly_the_reverse_even_within_one_millisecond(api, clock):
    admin = await api.admin()
    clock.frozen = dt.datetime(2026, 1, 25, 10, 30, 0, 123000, tzinfo=dt.timezone.utc)
    ids = [await api.submit(admin, f"job {n}") for n in range(6)]
    clock.frozen = None

    ascending = await job_ids(api, sort="createdAt")
    descending = await job_ids(api, sort="-createdAt")
    statuses = [(await api.status(admin, i))["createdAt"] for i in ids]

    assert set(statuses) == {"2026-01-25T10:30:00.123Z"}
    assert ascending == ids
    assert descending == list(reversed(ids))
    second_page = await job_ids(api, sort="-createdAt", limit="3", offset="3")
    assert second_page == list(reversed(ids))[3:]


@pytest.mark.parametrize("key", ["startedAt", "completedAt", "priority", "status"])
async def test_every_whitelisted_sort_reverses_exactly(api, key):
    admin = await api.admin()
    worker = await api.register()
    for n, priority in enumerate(["low", "high", "normal", "high", "low"]):
        await api.submit(admin, f"job {n}", priority=priority)
    for _ in range(2):
        job = await api.claim(worker)
        await result(api, worker, job["jobId"], 0)
    await api.claim(worker)

    ascending = await job_ids(api, sort=key)
    descending = await job_ids(api, sort=f"-{key}")

    assert len(ascending) == 5
    assert descending == list(reversed(ascending))


# -- durability -----------------------------------------------------------------


async def test_a_submitted_job_survives_a_restart(api, make_client):
    admin = await api.admin()
    job_id = await api.submit(admin, "make release", priority="high", timeout=42)
    await api.client.close()

    restarted = Api(await make_client())  # a new app on the same data dir
    token = await restarted.admin()

    job = await restarted.status(token, job_id)
    assert (job["status"], job["command"], job["timeout"]) == ("queued", "make release", 42)
    worker = await restarted.register()
    assert (await restarted.claim(worker))["jobId"] == job_id


async def test_a_priority_that_is_not_a_string_is_400(api):
    response = await api.call("POST", "/api/jobs/submit", token=await api.admin(),
                              json={"command": "make", "priority": ["high"]})

    assert response.status == 400
    assert (await response.json())["details"] == {"field": "priority"}
