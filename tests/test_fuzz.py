"""Property-based: random JSON and query strings at every endpoint of a real server never get a
500, and no answer or log line ever carries a password hash, a token or a token hash."""

from __future__ import annotations

import json
import socket
import sqlite3
import urllib.error
import urllib.parse
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ADMIN_EMAIL, ADMIN_PASSWORD, REGISTRATION_TOKEN, ServerProcess, server_environment

pytestmark = pytest.mark.slow

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)

FIELDS = ["command", "fileUrl", "workingDirectory", "timeout", "priority", "tags", "retries", "maxAttempts",
          "jobId", "attempt", "data", "type", "exitCode", "stdout", "stderr", "error", "workerId", "hostname",
          "cpuCount", "totalMemoryMb", "metadata", "status", "jobsCompleted", "email", "password", "role", "progress",
          "name", "expiresInDays", "cpus", "memoryMb", "gpus", "after", "jobs", "state", "pausedReason",
          "suspended", "evicted", "inputTree", "artifacts", "artifactsWhen", "env", "sha256"]
bodies = st.one_of(json_values, st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8))

# (method, path, who) — who: "admin", "worker" or "registration"
POST_ENDPOINTS = [
    ("POST", "/api/auth/login", None), ("POST", "/api/users", "admin"),
    ("POST", "/api/workers/register", "registration"), ("POST", "/api/workers/heartbeat", "worker"),
    ("POST", "/api/jobs/submit", "admin"), ("POST", "/api/jobs/stream-output", "worker"),
    ("POST", "/api/jobs/submit-result", "worker"), ("POST", "/api/jobs/cancel", "admin"),
    ("POST", "/api/auth/tokens", "admin"), ("POST", "/api/workers/approve", "admin"),
    ("POST", "/api/workers/pause", "admin"), ("POST", "/api/workers/resume", "admin"),
    ("POST", "/api/workers/registration-token", "admin"),  # pinned by the environment here: always a 409
    ("POST", "/api/blobs/missing", "admin"), ("POST", "/api/blobs/fetch", "worker"),
]
GET_ENDPOINTS = [
    ("/api/jobs/list", "admin"), ("/api/jobs/status", "admin"), ("/api/workers/list", "admin"),
    ("/api/auth/tokens", "admin"),
    ("/api/jobs/get-job", "worker"), ("/api/workers/x", "admin"), ("/api/files/download/x", "admin"),
    ("/uploads/x/y", "admin"), ("/api/health", None),
    ("/api/jobs/artifacts", "admin"), ("/api/jobs/follow", "admin"),  # no such job: never a stream that stays open
]
QUERY_KEYS = ["limit", "offset", "sort", "status", "workerId", "tags", "jobId"]
TRICKY_WAITS = ["nan", "inf", "-1", "1e999", "0", "0.1", "", "x", "61", "-0"]  # never a long wait
queries = st.builds(lambda q, w: {**q, **w},
                    st.dictionaries(st.sampled_from(QUERY_KEYS), st.text(max_size=12), max_size=4),
                    st.one_of(st.just({}), st.fixed_dictionaries({"wait": st.sampled_from(TRICKY_WAITS)})))


class Farm:
    def __init__(self, server: ServerProcess):
        self.server = server
        self.seen: list[str] = []
        self.credentials = {None: {}, "registration": {"Authorization": f"Bearer {REGISTRATION_TOKEN}"}}
        token = self.request("POST", "/api/auth/login", {}, {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})[1]
        self.credentials["admin"] = {"Authorization": f"Bearer {json.loads(token)['token']}"}
        worker = self.request("POST", "/api/workers/register", self.credentials["registration"],
                              {"workerId": "fuzz-worker", "hostname": "h"})[1]
        self.credentials["worker"] = {"x-worker-token": json.loads(worker)["token"]}
        self.seen.clear()  # the two answers above carry tokens by design; none after them may

    def request(self, method: str, path: str, headers: dict, body=None, raw: bytes | None = None) -> tuple[int, str]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.server.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read().decode()
            error.close()
        self.seen.append(text)
        return status, text


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("fuzz") / "data", server_environment()).start()
    yield Farm(server)
    server.stop()


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(endpoint=st.sampled_from(POST_ENDPOINTS), body=bodies)
def test_random_json_bodies_never_get_a_500(farm, endpoint, body):
    method, path, who = endpoint
    status, text = farm.request(method, path, farm.credentials[who], body)
    assert status < 500, text
    if status >= 400:
        assert {"error", "message", "code"} <= set(json.loads(text))


# A valid base and random other fields, so validation past the first required field is reached too.
VALID_BASES = [
    ("/api/jobs/submit", "admin", {"command": "make"}),
    ("/api/jobs/submit", "admin", {"jobs": [{"command": "make"}, {"command": "test", "after": ["#0"]}]}),
    ("/api/workers/register", "registration", {"workerId": "fuzzed", "hostname": "h"}),
    ("/api/workers/heartbeat", "worker", {"workerId": "fuzz-worker"}),
    ("/api/users", "admin", {"email": "fuzzed@example.com", "password": "fuzzed-password"}),
    ("/api/auth/tokens", "admin", {"name": "fuzzed"}),
    ("/api/workers/approve", "admin", {"workerId": "fuzz-worker"}),
    ("/api/workers/pause", "admin", {"workerId": "fuzz-worker"}),
    ("/api/blobs/missing", "admin", {"sha256": ["0" * 64]}),
    ("/api/blobs/fetch", "worker", {"jobId": "job-none", "sha256": []}),
]


@FUZZ
@given(endpoint=st.sampled_from(VALID_BASES),
       extra=st.dictionaries(st.sampled_from(FIELDS), json_values, min_size=1, max_size=4))
def test_a_valid_body_with_random_other_fields_never_gets_a_500(farm, endpoint, extra):
    path, who, base = endpoint
    status, text = farm.request("POST", path, farm.credentials[who], {**extra, **base})
    assert status < 500, text


@FUZZ
@given(items=st.lists(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4), min_size=1, max_size=4))
def test_batch_items_with_random_fields_never_get_a_500(farm, items):
    status, text = farm.request("POST", "/api/jobs/submit", farm.credentials["admin"],
                                {"jobs": [{"command": "make", **item} for item in items]})
    assert status < 500, text


@FUZZ
@given(endpoint=st.sampled_from(GET_ENDPOINTS), query=queries)
def test_random_query_strings_never_get_a_500(farm, endpoint, query):
    path, who = endpoint
    status, text = farm.request("GET", f"{path}?{urllib.parse.urlencode(query)}", farm.credentials[who])
    assert status < 500, text


@FUZZ
@given(raw=st.binary(max_size=200))
def test_random_bytes_as_a_body_never_get_a_500(farm, raw):
    status, text = farm.request("POST", "/api/jobs/submit", farm.credentials["admin"], raw=raw)
    assert status == 400, text


@FUZZ
@given(token_id=st.text(min_size=1, max_size=40))
def test_deleting_a_random_api_token_id_is_a_404(farm, token_id):
    status, text = farm.request("DELETE", f"/api/auth/tokens/{urllib.parse.quote(token_id, safe='')}",
                                farm.credentials["admin"])
    assert status in (404, 405), text  # 405: an id that empties the path


tree_entries = st.fixed_dictionaries(
    {"path": st.one_of(st.text(max_size=30), st.sampled_from(["../x", "/etc/passwd", "a/../../b", "C:/x", "a\\b",
                                                                "a//b", ".", "a/", "x" * 5000])),
     "sha256": st.one_of(st.just("0" * 64), st.text(max_size=70)), "size": json_values, "mode": json_values})


@FUZZ
@given(tree=st.lists(tree_entries, max_size=5))
def test_random_input_trees_are_refused_with_a_400_never_a_500(farm, tree):
    status, text = farm.request("POST", "/api/jobs/submit", farm.credentials["admin"],
                                {"command": "make", "inputTree": tree})
    assert status == 400, text  # no blob 000...0 is stored, so not even a valid tree passes


@FUZZ
@given(content=st.binary(max_size=300), name=st.one_of(st.text(max_size=70), st.just("0" * 64)))
def test_a_random_blob_under_a_random_name_is_refused_with_a_4xx(farm, content, name):
    path = f"/api/blobs/{urllib.parse.quote(name, safe='')}"
    status, text = farm.request("PUT", path, {**farm.credentials["admin"], "Content-Type": "application/octet-stream"},
                                raw=content)
    assert 400 <= status < 500, text  # 0...0 is no content's hash, so nothing random is ever stored


@FUZZ
@given(raw=st.binary(max_size=300), boundary=st.sampled_from(["", "x", "----b"]),
       endpoint=st.sampled_from([("/api/jobs/artifacts", "worker"), ("/api/blobs/batch", "admin")]))
def test_random_multipart_bodies_never_get_a_500(farm, raw, boundary, endpoint):
    path, who = endpoint
    headers = {**farm.credentials[who], "Content-Type": f"multipart/form-data; boundary={boundary}"}
    status, text = farm.request("POST", path, headers, raw=raw)
    assert 400 <= status < 500, text


@FUZZ
@given(raw=st.binary(max_size=300), size=st.integers(min_value=0, max_value=400),
       head=st.sampled_from([b"", b"0" * 64 + b" ", b"f" * 64 + b" 3\n"]))
def test_random_blob_batches_are_refused_with_a_4xx(farm, raw, size, head):
    body = head + (str(size).encode() + b"\n" if head.endswith(b" ") else b"") + raw
    status, text = farm.request("POST", "/api/blobs/batch", farm.credentials["admin"], raw=body)
    assert 400 <= status < 500, text  # no random content has the hash its line names


def send_raw(farm: Farm, head: bytes) -> None:
    """Bytes exactly as written, for requests urllib refuses to send; the answer is not kept."""
    with socket.create_connection(("127.0.0.1", farm.server.port), timeout=10) as sock:
        sock.sendall(head)
        sock.recv(65536)


def test_no_answer_or_log_line_carries_a_secret(farm):
    farm.request("GET", "/api/workers/list", farm.credentials["admin"])
    farm.request("GET", "/api/users", farm.credentials["admin"])
    for name, value in (*farm.credentials["admin"].items(), *farm.credentials["worker"].items()):
        # one bad byte: aiohttp refuses the header, and used to log it whole
        send_raw(farm, f"GET /api/jobs/list HTTP/1.1\r\nHost: dispatch\r\n{name}: {value}\x01\r\n\r\n".encode())
    db = sqlite3.connect(farm.server.data_dir / "dispatch.db")
    secrets = [row[0] for row in db.execute("SELECT password_hash FROM users UNION ALL SELECT token_hash FROM workers"
                                            " UNION ALL SELECT token_hash FROM api_tokens")]
    db.close()
    secrets += [farm.credentials["worker"]["x-worker-token"], farm.credentials["admin"]["Authorization"][7:],
                ADMIN_PASSWORD, (farm.server.data_dir / "jwt_secret").read_text()]
    everything = "\n".join(farm.seen) + farm.server.log().split("add a desktop", 1)[1]
    assert len(farm.seen) > 10
    for secret in secrets:
        assert secret not in everything
