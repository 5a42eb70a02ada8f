"""GET /api/jobs/follow: server-sent events of one job. History first, then live output joined by
offsets, state events, a final job.end, and the stream closes. With curl -N and the stdlib too."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request

import pytest

import dispatch


async def read_event(response) -> tuple[str, dict] | None:
    """The next event (name, data) of a follow answer; None at the end of the stream. Comments
    (keep-alives) are skipped."""
    name, data = None, None
    while True:
        line = await asyncio.wait_for(response.content.readline(), 5)
        if not line:
            return None
        line = line.decode().rstrip("\n")
        if line.startswith(":"):
            continue
        if not line:
            if name:
                return name, data
            continue
        field, _, value = line.partition(": ")
        if field == "event":
            name = value
        elif field == "data":
            data = json.loads(value)


async def output(api, worker, job, data, stream="stdout"):
    response = await api.call("POST", "/api/jobs/stream-output", worker=worker,
                              json={"jobId": job["jobId"], "attempt": job["attempt"], "data": data, "type": stream})
    assert response.status == 200


async def follow(api, token, job_id):
    response = await api.call("GET", f"/api/jobs/follow?jobId={job_id}", token=token)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return response


async def test_history_then_live_output_then_the_end_and_the_stream_closes(api):
    token = await api.admin()
    job_id = await api.submit(token, command="make")
    worker = await api.register()
    job = await api.claim(worker)
    await output(api, worker, job, "one\n")
    await output(api, worker, job, "warn\n", "stderr")

    response = await follow(api, token, job_id)
    status = await read_event(response)
    history = [await read_event(response), await read_event(response)]
    await output(api, worker, job, "two\n")
    live = await read_event(response)
    await api.call("POST", "/api/jobs/submit-result", worker=worker,
                   json={"jobId": job_id, "attempt": job["attempt"], "exitCode": 3, "stdout": "three\n"})
    rest = []
    while (event := await read_event(response)) is not None:
        rest.append(event)

    assert status[0] == "job.status" and status[1]["status"] == "running" and "stdout" not in status[1]
    assert [(name, e["stream"], e["offset"], e["data"], e.get("history")) for name, e in history] == [
        ("job.output", "stdout", 0, "one\n", True), ("job.output", "stderr", 0, "warn\n", True)]
    assert (live[0], live[1]["offset"], live[1]["data"]) == ("job.output", 4, "two\n")
    assert [name for name, _ in rest] == ["job.output", "job.completed", "job.end"]
    assert (rest[0][1]["offset"], rest[0][1]["data"]) == (8, "three\n")
    end = rest[-1][1]
    assert (end["status"], end["exitCode"], end["stdoutChars"]) == ("failed", 3, 14)


async def test_a_finished_job_sends_its_history_and_the_end_at_once(api):
    token = await api.admin()
    job_id = await api.submit(token)
    worker = await api.register()
    job = await api.claim(worker)
    await api.call("POST", "/api/jobs/submit-result", worker=worker,
                   json={"jobId": job_id, "attempt": job["attempt"], "exitCode": 0, "stdout": "done\n"})

    response = await follow(api, token, job_id)
    events = []
    while (event := await read_event(response)) is not None:
        events.append(event)

    assert [name for name, _ in events] == ["job.status", "job.output", "job.end"]
    assert events[1][1]["data"] == "done\n" and events[2][1]["exitCode"] == 0


async def test_a_queued_job_reports_its_start(api):
    token = await api.admin()
    job_id = await api.submit(token)
    response = await follow(api, token, job_id)
    assert (await read_event(response))[1]["status"] == "queued"

    worker = await api.register()
    await api.claim(worker)

    name, event = await read_event(response)
    assert (name, event["status"], event["workerId"]) == ("job.started", "running", "worker-001")
    response.close()


async def test_an_unknown_job_is_a_404_and_a_missing_id_a_400(api, client):
    token = await api.admin()
    assert (await api.call("GET", "/api/jobs/follow?jobId=job-nope", token=token)).status == 404
    assert (await api.call("GET", "/api/jobs/follow", token=token)).status == 400
    assert client.app[dispatch.HUB].client_count == 0  # the refused follows left no feed behind


async def test_logging_out_ends_the_follow(api):
    token, _ = await api.new_user()
    job_id = await api.submit(token)
    response = await follow(api, token, job_id)
    await read_event(response)
    await api.call("POST", "/api/auth/logout", token=token)
    name, event = await read_event(response)
    assert (name, event["reason"]) == ("follow.interrupted", "logged out")
    assert await read_event(response) is None


def test_the_join_skips_what_the_history_showed_and_trims_an_overlap():
    join = dispatch._OutputJoin(1, {"stdout": 5, "stderr": 0})
    chunk = lambda offset, data, attempt=1, stream="stdout": {  # noqa: E731
        "type": "job.output", "attempt": attempt, "stream": stream, "offset": offset, "data": data}

    assert join.chunk(chunk(0, "hello")) is None  # all in the history
    assert join.chunk(chunk(3, "lo wo"))["data"] == " wo"  # the overlap trimmed
    assert join.chunk(chunk(8, "rld"))["offset"] == 8
    assert join.chunk(chunk(0, "old", attempt=0)) is None  # an earlier attempt's last words
    fresh = join.chunk(chunk(0, "again", attempt=2))  # a new attempt starts afresh
    assert (fresh["offset"], fresh["data"], join.known) == (0, "again", {"stdout": 5, "stderr": 0})


# -- a real server: curl -N and the stdlib -----------------------------------------------------------


@pytest.mark.slow
def test_curl_and_urllib_follow_a_running_job_live(server, user, start_agent):
    """curl -N prints the output while the job still runs, then the end, and exits by itself."""
    start_agent("follow-1")
    job_id = user.submit("echo first; sleep 2; echo second")
    user.wait(job_id, until=lambda job: "first" in job["stdout"])

    curl = subprocess.Popen(["curl", "-sN", "-H", f"Authorization: Bearer {user.token}",
                             f"{server.url}/api/jobs/follow?jobId={job_id}"], stdout=subprocess.PIPE, text=True)
    request = urllib.request.Request(f"{server.url}/api/jobs/follow?jobId={job_id}",
                                     headers={"Authorization": f"Bearer {user.token}"})
    seen, started = [], time.monotonic()
    with urllib.request.urlopen(request, timeout=30) as stream:
        for raw in stream:
            line = raw.decode().rstrip("\n")
            if line.startswith("data: "):
                event = json.loads(line[6:])
                seen.append((event["type"], event.get("data"), round(time.monotonic() - started, 1)))
    curl_text, _ = curl.communicate(timeout=30)

    assert seen[0][0] == "job.status"
    assert seen[1][:2] == ("job.output", "first\n")
    second = next(item for item in seen if item[1] == "second\n")
    assert second[2] >= 1.0  # it came live, well after the history
    assert seen[-1][0] == "job.end"
    assert curl.returncode == 0
    assert "event: job.output" in curl_text and "second" in curl_text and curl_text.rstrip().splitlines()[-2] == \
        "event: job.end"
