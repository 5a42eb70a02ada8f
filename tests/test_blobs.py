"""Content-addressed inputs: POST /api/blobs/missing, PUT /api/blobs/{sha256}, POST /api/blobs/batch,
jobs given as an inputTree, and POST /api/blobs/fetch for the worker that holds such a job."""

from __future__ import annotations

import hashlib
import io

import pytest

import dispatch
from conftest import stored


def sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


async def put(api, token: str, content: bytes, name: str | None = None):
    return await api.call("PUT", f"/api/blobs/{name or sha(content)}", token=token, data=io.BytesIO(content))


async def missing(api, token: str, hashes: list[str]) -> list[str]:
    response = await api.call("POST", "/api/blobs/missing", token=token, json={"sha256": hashes})
    assert response.status == 200, await response.text()
    return (await response.json())["missing"]


def entry(path: str, content: bytes, mode: int = 0o644) -> dict:
    return {"path": path, "sha256": sha(content), "size": len(content), "mode": mode}


async def submit_tree(api, token: str, tree: list[dict], **fields):
    body = {"command": "make", "inputTree": tree, **fields}
    return await api.call("POST", "/api/jobs/submit", token=token, json=body)


async def fetch(api, worker: str, job: dict, hashes: list[str]):
    return await api.call("POST", "/api/blobs/fetch", worker=worker,
                          json={"jobId": job["jobId"], "attempt": job["attempt"], "sha256": hashes})


# -- missing, put, batch ------------------------------------------------------------------------------


async def test_only_what_the_server_lacks_is_missing_and_a_put_fills_it(api):
    token, _ = await api.new_user()
    a, b = b"alpha\n", b"beta\n"

    assert await missing(api, token, [sha(a), sha(b), sha(a)]) == [sha(a), sha(b)]
    response = await put(api, token, a)
    assert response.status == 201, await response.text()
    assert (await response.json())["size"] == len(a)
    assert await missing(api, token, [sha(a), sha(b)]) == [sha(b)]


async def test_a_blob_whose_content_does_not_match_its_hash_is_refused_and_nothing_is_kept(api, config):
    token, _ = await api.new_user()
    claimed = sha(b"what the client said")

    response = await put(api, token, b"something else", name=claimed)

    assert response.status == 400
    body = await response.json()
    assert body["code"] == "BLOB_HASH_MISMATCH" and sha(b"something else") in body["message"]
    assert await missing(api, token, [claimed]) == [claimed]
    assert await stored(config) == []


@pytest.mark.parametrize("name", ["ABC", "0" * 63, "g" * 64, "A" * 64])
async def test_a_blob_name_that_is_no_sha256_is_refused(api, name):
    token, _ = await api.new_user()
    response = await put(api, token, b"x", name=name)
    assert response.status == 400 and (await response.json())["details"]["field"] == "sha256"


async def test_a_blob_larger_than_the_upload_limit_is_refused(make_client):
    from conftest import Api

    api = Api(await make_client(max_upload_mb=1))
    token = await api.admin()
    content = b"x" * (1024 * 1024 + 1)
    response = await put(api, token, content)
    assert response.status == 400 and (await response.json())["code"] == "FILE_TOO_LARGE"


def batch(contents: list[bytes], names: dict | None = None) -> io.BytesIO:
    """A POST /api/blobs/batch body: per blob a line '<sha256> <size>', then its content."""
    return io.BytesIO(b"".join(f"{(names or {}).get(i, sha(c))} {len(c)}\n".encode() + c
                               for i, c in enumerate(contents)))


async def test_a_batch_stores_every_blob_or_none(api):
    token, _ = await api.new_user()
    blobs = [f"file {i}\n".encode() for i in range(5)] + [b"", b"\n" * 3]

    bad = await api.call("POST", "/api/blobs/batch", token=token, data=batch(blobs, {3: sha(b"other")}))
    assert bad.status == 400 and (await bad.json())["code"] == "BLOB_HASH_MISMATCH"
    assert await missing(api, token, [sha(b) for b in blobs]) == [sha(b) for b in blobs]

    good = await api.call("POST", "/api/blobs/batch", token=token, data=batch(blobs))
    assert good.status == 201, await good.text()
    assert (await good.json())["stored"] == 7
    assert await missing(api, token, [sha(b) for b in blobs]) == []


@pytest.mark.parametrize("body, code", [
    (b"", "MISSING_FILE"),
    (b"not a header\n", "MALFORMED_UPLOAD"),
    (b"x" * 300_000, "MALFORMED_UPLOAD"),
    (("0" * 64 + " 10\nshort").encode(), "TRUNCATED_UPLOAD"),
    (("0" * 64 + " 99999999999\n").encode(), "FILE_TOO_LARGE"),
])
async def test_a_malformed_batch_is_refused(api, body, code):
    token, _ = await api.new_user()
    response = await api.call("POST", "/api/blobs/batch", token=token, data=io.BytesIO(body))
    assert response.status == 400 and (await response.json())["code"] == code


async def test_knowing_a_hash_is_not_having_the_content(api):
    """Another person's blob is missing for me until I send it myself; only then may I name it."""
    alice, _ = await api.new_user("alice@example.com")
    bob, _ = await api.new_user("bob@example.com")
    secret = b"alice's private key\n"
    assert (await put(api, alice, secret)).status == 201

    assert await missing(api, bob, [sha(secret)]) == [sha(secret)]
    refused = await submit_tree(api, bob, [entry("key", secret)])
    assert refused.status == 400 and "not stored or not yours" in (await refused.json())["message"]
    assert await missing(api, await api.admin(), [sha(secret)]) == []  # an admin may use any stored blob

    assert (await put(api, bob, secret)).status == 201  # sending it proves having it
    assert (await submit_tree(api, bob, [entry("key", secret)])).status == 201


# -- inputTree on submit ------------------------------------------------------------------------------


HOSTILE_PATHS = [
    ("../outside", "climbs out with '..'"),
    ("a/../../b", "climbs out with '..'"),
    ("/etc/passwd", "is an absolute path"),
    ("C:/Windows/x", "drive letter"),
    ("a\\b", "backslash"),
    ("a//b", "not normalized"),
    ("./a", "not normalized"),
    ("a/", "not normalized"),
    ("", "is empty"),
    ("new\nline", "control character"),
]


@pytest.mark.parametrize("path, reason", HOSTILE_PATHS, ids=[p for p, _ in HOSTILE_PATHS])
async def test_a_tree_path_that_could_leave_the_job_directory_is_refused(api, path, reason):
    token, _ = await api.new_user()
    content = b"x"
    await put(api, token, content)

    response = await submit_tree(api, token, [entry(path, content)])

    assert response.status == 400
    body = await response.json()
    assert body["details"]["field"] == "inputTree" and reason in body["message"]


@pytest.mark.parametrize("tree, reason", [
    ([], "must be a list of 1 to"),
    ("a.txt", "must be a list of 1 to"),
    ([{"path": "a", "sha256": "0" * 64, "size": 1, "mode": 420, "extra": 1}], "must be an object"),
    ([{"path": "a", "sha256": "XYZ", "size": 1}], "sha256 must be"),
    ([{"path": "a", "sha256": "0" * 64, "size": -1}], "size must be"),
    ([{"path": "a", "sha256": "0" * 64, "size": 1, "mode": "755"}], "mode must be"),
    ([{"path": "a", "sha256": "0" * 64, "size": 1}, {"path": "a", "sha256": "1" * 64, "size": 1}], "twice"),
    ([{"path": "a", "sha256": "0" * 64, "size": 1}, {"path": "a/b", "sha256": "1" * 64, "size": 1}],
     "as a file and as the folder"),
])
async def test_a_malformed_tree_is_refused(api, tree, reason):
    token, _ = await api.new_user()
    response = await submit_tree(api, token, tree)
    assert response.status == 400 and reason in (await response.json())["message"]


async def test_a_tree_whose_sizes_disagree_with_its_blobs_is_refused(api):
    token, _ = await api.new_user()
    await put(api, token, b"four")
    response = await submit_tree(api, token, [{**entry("a", b"four"), "size": 5}])
    assert response.status == 400 and "has 4" in (await response.json())["message"]


async def test_fileurl_and_inputtree_together_are_refused(api):
    token, _ = await api.new_user()
    await put(api, token, b"x")
    response = await submit_tree(api, token, [entry("x", b"x")], fileUrl="/uploads/file-" + "0" * 32 + "/p.zip")
    assert response.status == 400 and "not both" in (await response.json())["message"]


async def test_the_worker_gets_the_tree_and_fetches_its_blobs_in_one_request(api):
    token, _ = await api.new_user()
    files = {"src/main.c": b"int main(){}\n", "build.sh": b"#!/bin/sh\nmake\n", "empty": b""}
    for content in files.values():
        await put(api, token, content)
    tree = [entry(path, content, 0o755 if path.endswith(".sh") else 0o644) for path, content in files.items()]
    response = await submit_tree(api, token, tree, artifacts=["out/**"], env={"GREETING": "hi"})
    assert response.status == 201, await response.text()
    worker = await api.register()

    job = await api.claim(worker)

    assert sorted(job["inputTree"], key=lambda e: e["path"]) == sorted(tree, key=lambda e: e["path"])
    assert (job["artifactPatterns"], job["artifactsWhen"], job["env"]) == (["out/**"], "on_success", {"GREETING": "hi"})
    assert job["maxArtifactBytes"] == 1024 * 1024 * 1024
    order = [sha(files["build.sh"]), sha(files["src/main.c"]), sha(files["empty"])]
    fetched = await fetch(api, worker, job, order)
    assert fetched.status == 200
    assert await fetched.read() == files["build.sh"] + files["src/main.c"]


async def test_a_worker_may_fetch_only_blobs_of_a_job_it_holds(api):
    token, _ = await api.new_user()
    mine, other = b"in the tree", b"not in the tree"
    await put(api, token, mine)
    await put(api, token, other)
    assert (await submit_tree(api, token, [entry("a", mine)])).status == 201
    worker, stranger = await api.register("w1"), await api.register("w2")
    job = await api.claim(worker)

    assert (await fetch(api, worker, job, [sha(other)])).status == 403
    assert (await fetch(api, stranger, job, [sha(mine)])).status == 409
    assert (await fetch(api, worker, {**job, "attempt": job["attempt"] + 1}, [sha(mine)])).status == 409
    user_asks = await api.call("POST", "/api/blobs/fetch", token=token, json={"jobId": job["jobId"], "sha256": []})
    assert user_asks.status == 403


async def test_status_shows_what_a_job_asked(api):
    token, _ = await api.new_user()
    job_id = await api.submit(token, artifacts=["dist/**", "report.xml"], artifactsWhen="always",
                              env={"MODE": "release"})
    job = await api.status(token, job_id)
    assert (job["artifactPatterns"], job["artifactsWhen"], job["env"], job["artifacts"]) == (
        ["dist/**", "report.xml"], "always", {"MODE": "release"}, None)


@pytest.mark.parametrize("env, reason", [
    ({"DISPATCH_JOB_ID": "x"}, "reserved"),
    ({"dispatch_cpus": "x"}, "reserved"),
    ({"1ABC": "x"}, "letters, digits"),
    ({"A-B": "x"}, "letters, digits"),
    ({"A": 1}, "must be a string"),
    ({"A": "nul\0"}, "without NUL"),
    ({"A": "x" * 40_000}, "larger than"),
    (["A=1"], "must be an object"),
])
async def test_a_bad_env_is_refused(api, env, reason):
    token, _ = await api.new_user()
    response = await api.call("POST", "/api/jobs/submit", token=token, json={"command": "make", "env": env})
    assert response.status == 400 and reason in (await response.json())["message"]


@pytest.mark.parametrize("patterns, reason", [
    (["../secret"], "climbs out"),
    (["/etc/passwd"], "absolute path"),
    (["C:/x"], "drive letter"),
    (["dist\\x"], "backslash"),
    ("dist/**", "must be a list"),
    ([""], "must be a list"),
])
async def test_an_artifacts_pattern_that_could_leave_the_working_directory_is_refused(api, patterns, reason):
    token, _ = await api.new_user()
    response = await api.call("POST", "/api/jobs/submit", token=token, json={"command": "make", "artifacts": patterns})
    assert response.status == 400 and reason in (await response.json())["message"]


async def test_artifacts_when_must_be_one_of_three(api):
    token, _ = await api.new_user()
    response = await api.call("POST", "/api/jobs/submit", token=token, json={"command": "m", "artifactsWhen": "never"})
    assert response.status == 400 and (await response.json())["details"]["field"] == "artifactsWhen"


# -- expiry -------------------------------------------------------------------------------------------


async def test_blobs_expire_once_no_job_or_tree_has_used_them_for_the_ttl(client, api, clock, config):
    token, _ = await api.new_user()
    used, unused = b"named by a job", b"never named"
    await put(api, token, used)
    await put(api, token, unused)
    job_id = (await (await submit_tree(api, token, [entry("a", used)])).json())["jobId"]

    clock.advance(config.file_ttl_days * 86400 + 60)
    await dispatch._sweep_storage(client.app)

    assert await stored(config) == [dispatch.Blobs.key(sha(used))]  # its job still exists: the tree holds it
    assert await missing(api, token, [sha(used), sha(unused)]) == [sha(unused)]

    await api.call("POST", "/api/jobs/cancel", token=token, json={"jobId": job_id})
    clock.advance((config.job_retention_days + config.file_ttl_days) * 86400 + 60)
    await dispatch._sweep_storage(client.app)

    assert await stored(config) == []
    assert await missing(api, token, [sha(used)]) == [sha(used)]
