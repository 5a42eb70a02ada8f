"""agent.py's transfers without a server: artifacts collected (globs, never a symbolic link, never
outside the working directory, the cap), input trees placed from the content cache (hostile paths,
a blob that does not match its hash), artifacts unpacked by the client (never outside its folder,
never into .git), the files `agent.py run` sends (git's view, .dispatchignore), and the client's
joining of output by offsets."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

import agent

unix_only = pytest.mark.skipif(sys.platform.startswith("win"), reason="symbolic links and modes")


def sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def write(root: Path, files: dict) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


def zipped(archive: Path) -> dict:
    with zipfile.ZipFile(archive) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


# -- artifacts: collect ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern, matches, misses", [
    ("dist/**", ["dist/a", "dist/x/y/z"], ["distx", "other/dist/a"]),
    ("dist", ["dist/a", "dist/x/y"], ["dist2/a"]),
    ("dist/", ["dist/a"], ["distribution"]),
    ("*.xml", ["report.xml"], ["sub/report.xml"]),
    ("**/*.xml", ["report.xml", "a/b/report.xml"], ["report.xmlx"]),
    ("build/*/out.bin", ["build/linux/out.bin"], ["build/out.bin", "build/a/b/out.bin"]),
    ("log?.txt", ["log1.txt"], ["log12.txt"]),
    ("[ab]*.txt", ["a1.txt", "b.txt"], ["c.txt"]),
    ("[!a]*.txt", ["b.txt"], ["a.txt"]),
    ("[a-c].txt", ["b.txt"], ["-.txt", "d.txt"]),
    ("./out/**", ["out/x"], []),
])
def test_artifact_globs(pattern, matches, misses):
    regex = agent._glob_regex(pattern)
    assert [m for m in matches if not regex.fullmatch(m)] == []
    assert [m for m in misses if regex.fullmatch(m)] == []


@unix_only
def test_matching_regular_files_are_zipped_with_their_paths_and_modes(tmp_path):
    root = tmp_path / "job"
    write(root, {"dist/app.bin": b"\x00" * 1000, "dist/sub/readme.txt": "hi", "report.xml": "<ok/>",
                 "src/main.c": "int main;"})
    (root / "dist/app.bin").chmod(0o755)
    archive = tmp_path / "artifacts.zip"

    files, notes = agent.collect_artifacts(root, ["dist/**", "report.xml", "missing/*"], archive)

    assert files == 3
    assert zipped(archive) == {"dist/app.bin": b"\x00" * 1000, "dist/sub/readme.txt": b"hi", "report.xml": b"<ok/>"}
    with zipfile.ZipFile(archive) as zf:
        assert (zf.getinfo("dist/app.bin").external_attr >> 16) & 0o111
    assert notes == ["artifacts: no file matched 'missing/*'"]


@unix_only
def test_a_symbolic_link_is_never_followed_out_of_the_job_directory(tmp_path):
    root = tmp_path / "job"
    write(root, {"dist/real.txt": "real"})
    (root / "dist/passwd").symlink_to("/etc/passwd")
    (root / "dist/etc").symlink_to("/etc", target_is_directory=True)
    archive = tmp_path / "artifacts.zip"

    files, notes = agent.collect_artifacts(root, ["dist/**", "**/passwd"], archive)

    assert files == 1 and list(zipped(archive)) == ["dist/real.txt"]
    assert "artifacts: skipped dist/passwd: a symbolic link (to /etc/passwd); artifacts are regular files only" in notes
    assert any(note.startswith("artifacts: skipped dist/etc: a symbolic link") for note in notes)
    assert not any("hosts" in name or "shadow" in name for name in zipped(archive))


@pytest.mark.parametrize("pattern", ["../outside/*", "/etc/passwd", "a/../../b", "C:/x", "..\\x", "", "./"])
def test_a_pattern_that_could_leave_the_working_directory_is_skipped_with_a_reason(tmp_path, pattern):
    root = tmp_path / "job" / "work"
    write(tmp_path, {"job/work/in.txt": "in", "job/outside/secret.txt": "secret"})
    archive = tmp_path / "artifacts.zip"

    files, notes = agent.collect_artifacts(root, [pattern], archive)

    assert files == 0 and zipped(archive) == {}
    assert len(notes) == 1 and "skipped (patterns stay inside the working directory)" in notes[0]


def test_artifacts_past_the_cap_stop_with_a_reason(tmp_path):
    root = tmp_path / "job"
    write(root, {"out/big.bin": os.urandom(3 * 1024 * 1024)})
    with pytest.raises(agent.ArtifactsTooBig, match="artifacts too big: more than 1 MB"):
        agent.collect_artifacts(root, ["out/**"], tmp_path / "a.zip", max_bytes=1024 * 1024)


# -- input trees ----------------------------------------------------------------------------------------


class FakeServer:
    """open_blobs for place_tree: the contents of the blobs asked for, one after the other."""

    def __init__(self, blobs: dict, *, lie: dict | None = None, break_first: bool = False):
        self.blobs, self.lie, self.asked, self.break_first = blobs, lie or {}, [], break_first

    @contextlib.contextmanager
    def __call__(self, batch):
        self.asked.append([h for h, _ in batch])
        body = b"".join(self.lie.get(h, self.blobs[h]) for h, _ in batch)
        if self.break_first:
            self.break_first = False
            body = body[:1]
        yield io.BytesIO(body)


def tree(files: dict, modes: dict | None = None) -> tuple[list, dict]:
    entries = [{"path": path, "sha256": sha(content), "size": len(content), "mode": (modes or {}).get(path, 0o644)}
               for path, content in files.items()]
    return entries, {sha(content): content for content in files.values()}


@pytest.fixture
def cache(tmp_path):
    cache = agent._DownloadCache(tmp_path / "cache")
    cache.clean()
    return cache


@unix_only
def test_a_tree_is_placed_from_fetched_blobs_and_then_from_the_cache_alone(tmp_path, cache):
    files = {"src/main.c": b"int main(){}\n", "build.sh": b"#!/bin/sh\n", "docs/same.txt": b"same", "same.txt": b"same",
             "empty": b""}
    entries, blobs = tree(files, {"build.sh": 0o755})
    server = FakeServer(blobs)

    fetched = agent.place_tree(entries, tmp_path / "job1", cache, server, threading.Event())
    agent.place_tree(entries, tmp_path / "job2", cache, server, threading.Event())

    assert fetched == sum(len(c) for c in blobs.values())
    assert len(server.asked) == 1 and sorted(server.asked[0]) == sorted(blobs)  # each content once, then cached
    for job in ("job1", "job2"):
        assert {p: (tmp_path / job / p).read_bytes() for p in files} == files
    assert (tmp_path / "job2/build.sh").stat().st_mode & stat.S_IXUSR
    assert not (tmp_path / "job2/src/main.c").stat().st_mode & stat.S_IXUSR
    (tmp_path / "job1/src/main.c").write_text("changed by the job")
    assert cache.path(sha(files["src/main.c"])).read_bytes() == files["src/main.c"]  # the cache is untouched


def test_a_broken_fetch_is_asked_again_for_what_did_not_arrive(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(agent._Backoff, "next", lambda self, retry_after=None: 0.0)
    entries, blobs = tree({"a": b"aaaa", "b": b"bbbb"})
    server = FakeServer(blobs, break_first=True)
    agent.place_tree(entries, tmp_path / "job", cache, server, threading.Event())
    assert len(server.asked) == 2 and (tmp_path / "job/b").read_bytes() == b"bbbb"


@pytest.mark.parametrize("path, reason", [
    ("../escape.txt", "climbs out with '..'"),
    ("a/../../escape.txt", "climbs out with '..'"),
    ("/tmp/escape.txt", "is an absolute path"),
    ("C:/escape.txt", "drive letter"),
    ("a\\..\\escape.txt", "backslash"),
    ("", "empty path"),
])
def test_a_hostile_tree_path_is_refused_and_nothing_is_written(tmp_path, cache, path, reason):
    entries, blobs = tree({"fine.txt": b"fine", path: b"evil"})
    server = FakeServer(blobs)
    job = tmp_path / "work" / "job"
    job.mkdir(parents=True)

    with pytest.raises(agent.UnsafeArchive, match=reason):
        agent.place_tree(entries, job, cache, server, threading.Event())

    assert server.asked == [] and list(job.iterdir()) == []  # checked before anything was fetched or written
    assert not (tmp_path / "work" / "escape.txt").exists() and not Path("/tmp/escape.txt").exists()


def test_a_blob_whose_content_does_not_match_its_hash_is_refused(tmp_path, cache):
    entries, blobs = tree({"a.txt": b"the real content"})
    server = FakeServer(blobs, lie={sha(b"the real content"): b"something else!!"})

    with pytest.raises(agent.JobSetupError, match="whose sha256 is"):
        agent.place_tree(entries, tmp_path / "job", cache, server, threading.Event())

    assert not cache.path(sha(b"the real content")).exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []
    assert not (tmp_path / "job" / "a.txt").exists()


def test_a_malformed_tree_entry_is_a_setup_failure(tmp_path, cache):
    with pytest.raises(agent.JobSetupError, match="malformed"):
        agent.place_tree([{"path": "a", "sha256": "nothex", "size": 1}], tmp_path / "job", cache,
                         FakeServer({}), threading.Event())


def test_get_job_fields_become_the_job(tmp_path):
    job = agent._Job.from_api({"jobId": "job-1", "command": "make", "attempt": 2, "inputTree": [],
                               "artifactPatterns": ["dist/**"], "artifactsWhen": "always", "env": {"B": "2", "A": "1"},
                               "maxArtifactBytes": 1024})
    assert (job.input_tree, job.artifact_patterns, job.artifacts_when, job.env, job.max_artifact_bytes) == (
        [], ("dist/**",), "always", (("A", "1"), ("B", "2")), 1024)
    with pytest.raises(agent.ServerUnavailable):
        agent._Job.from_api({"jobId": "job-1", "command": "make", "env": {"A": 1}})


# -- the client: unpacking artifacts ----------------------------------------------------------------------


def make_zip(path: Path, entries: dict, links: dict | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in entries.items():
            zf.writestr(name, content)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


@unix_only
def test_artifacts_land_in_the_folder_and_nowhere_else(tmp_path):
    folder = tmp_path / "project"
    write(folder, {"dist/old.txt": "old", ".git/HEAD": "ref: refs/heads/main\n"})
    (folder / "out").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    (folder / "hooks").symlink_to(folder / ".git", target_is_directory=True)
    (folder / "dist/link.txt").symlink_to(tmp_path / "target.txt")
    (tmp_path / "target.txt").write_text("untouched")
    archive = make_zip(tmp_path / "a.zip", {"dist/old.txt": "new", "dist/new/file.txt": "file", "../escape.txt": "x",
                                            "/abs.txt": "x", ".git/hooks/post-checkout": "#!/bin/sh\nevil",
                                            "out/through-a-link.txt": "x", "hooks/pre-commit": "evil",
                                            "dist/link.txt": "replaced"},
                       links={"dist/passwd": "/etc/passwd"})

    files, notes = agent.extract_artifacts(archive, folder)

    assert files == 3
    assert (folder / "dist/old.txt").read_text() == "new" and (folder / "dist/new/file.txt").read_text() == "file"
    assert (folder / "dist/link.txt").read_text() == "replaced" and not (folder / "dist/link.txt").is_symlink()
    assert (tmp_path / "target.txt").read_text() == "untouched"  # the link was replaced, not written through
    assert not (tmp_path / "escape.txt").exists() and not Path("/abs.txt").exists()
    assert list((tmp_path / "elsewhere").iterdir()) == []
    assert not (folder / ".git/hooks").exists() and not (folder / ".git/pre-commit").exists()
    assert not (folder / "dist/passwd").exists()
    assert len(notes) == 6, notes
    assert any("climbs out with '..'" in n for n in notes) and any("absolute path" in n for n in notes)
    assert any("symbolic link" in n for n in notes) and any("nothing is written into .git" in n for n in notes)


# -- the client: which files are sent -------------------------------------------------------------------------


def git(folder: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=folder, check=True, capture_output=True)


@unix_only
def test_in_a_git_work_tree_git_decides_and_git_stays_home(tmp_path):
    folder = tmp_path / "repo"
    write(folder, {"src/main.c": "int main;", ".gitignore": "build/\n*.log\n", "build/out.o": "obj", "debug.log": "x",
                   "new-untracked.txt": "u", "deleted.txt": "d", ".dispatchignore": "data/\n!data/keep.csv\n*.tmp\n",
                   "data/big.csv": "1,2", "data/keep.csv": "3,4", "scratch.tmp": "t", "docs/notes.tmp": "t"})
    git(folder, "init", "-q")
    git(folder, "add", "src", ".gitignore", "deleted.txt")
    git(folder, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    (folder / "deleted.txt").unlink()
    (folder / "link-in.txt").symlink_to("src/main.c")
    (folder / "link-out.txt").symlink_to("/etc/passwd")

    entries, notes = agent.collect_files(folder)

    assert sorted(rel for rel, *_ in entries) == [".dispatchignore", ".gitignore", "data/keep.csv", "link-in.txt",
                                                  "new-untracked.txt", "src/main.c"]
    assert notes == ["skipped link-out.txt: a symbolic link to /etc/passwd, outside the folder"]
    sub, _ = agent.collect_files(folder / "src")  # inside a work tree, below its top
    assert [rel for rel, *_ in sub] == ["main.c"]


def test_outside_git_everything_is_sent_but_git_folders(tmp_path):
    write(tmp_path, {"a.txt": "a", "b/c.txt": "c", ".git/config": "x", "b/.git/HEAD": "x"})
    entries, _ = agent.collect_files(tmp_path)
    assert sorted(rel for rel, *_ in entries) == ["a.txt", "b/c.txt"]


# -- the client: bodies, output, arguments ------------------------------------------------------------------


def test_a_multipart_body_is_as_long_as_it_says(tmp_path):
    write(tmp_path, {"one": b"1" * 10, "two": b""})
    body = agent._Multipart()
    body.field("jobId", "job-1")
    body.file("a" * 64, tmp_path / "one", 10)
    body.file("b" * 64, tmp_path / "two", 0)
    assert len(b"".join(body.chunks())) == body.length()
    (tmp_path / "one").write_bytes(b"short")
    with pytest.raises(agent.AgentError, match="changed while it was being sent"):
        b"".join(body.chunks())


def test_output_is_joined_by_offsets_across_reconnects_and_attempts():
    out, err, said = io.StringIO(), io.StringIO(), []
    shown = agent._Shown(out, err, said.append)
    events = [("job.output", {"attempt": 1, "stream": "stdout", "offset": 0, "data": "abc", "history": True}),
              ("job.output", {"attempt": 1, "stream": "stderr", "offset": 0, "data": "E1"}),
              ("job.output", {"attempt": 1, "stream": "stdout", "offset": 3, "data": "de"}),
              # the follow broke; following again sends the history from the start
              ("job.output", {"attempt": 1, "stream": "stdout", "offset": 0, "data": "abcdef", "history": True}),
              ("job.started", {"attempt": 2, "workerId": "w2", "status": "running"}),
              ("job.output", {"attempt": 2, "stream": "stdout", "offset": 0, "data": "again"}),
              ("job.output", {"attempt": 1, "stream": "stdout", "offset": 6, "data": "late"})]
    for name, event in events:
        shown.event(name, event)
    assert (out.getvalue(), err.getvalue()) == ("abcdefagain", "E1")
    assert said == ["attempt 2 started on w2"]


@pytest.mark.parametrize("argv, message", [
    (["--server", "http://x", "--api-token", "t", "make"], "put the command after --"),
    (["--server", "http://x", "--api-token", "t", "--"], "the command after -- is missing"),
    (["--api-token", "t", "--", "make"], "--server"),
    (["--server", "http://x", "--", "make"], "--api-token"),
    (["--server", "http://x", "--api-token", "t", "--env", "1A=b", "--", "make"], "must be NAME=VALUE"),
])
def test_the_client_says_what_is_wrong_with_its_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        agent.run_client(argv, environ={})
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_one_word_is_a_shell_command_and_several_are_quoted():
    assert agent._shell_command(["make && make test"]) == "make && make test"
    assert agent._shell_command(["python", "-c", "print('a b')"]) == "python -c 'print('\"'\"'a b'\"'\"')'"


def test_a_file_that_looks_unchanged_is_not_read_again(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    write(folder, {"old.txt": "old", "changed.txt": "before"})
    past = time.time() - 60
    for name in ("old.txt", "changed.txt"):
        os.utime(folder / name, (past, past))
    environ = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    first = agent._HashCache(folder, environ)
    assert first.hash("old.txt", folder / "old.txt") == (sha(b"old"), 3)
    first.hash("changed.txt", folder / "changed.txt")
    first.save()

    (folder / "changed.txt").write_text("after!")
    (folder / "new.txt").write_text("new")  # written just now: as racy as git says, so it is read
    read = []
    real = agent._hash_file
    monkeypatch.setattr(agent, "_hash_file", lambda path: read.append(Path(path).name) or real(path))
    second = agent._HashCache(folder, environ)
    hashes = {name: second.hash(name, folder / name) for name in ("old.txt", "changed.txt", "new.txt")}

    assert hashes == {"old.txt": (sha(b"old"), 3), "changed.txt": (sha(b"after!"), 6), "new.txt": (sha(b"new"), 3)}
    assert read == ["changed.txt", "new.txt"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_progress_bar_shows_on_a_terminal_and_nowhere_else():
    shown, piped = Terminal(), io.StringIO()
    for stream in (shown, piped):
        progress = agent._Progress(stream)
        progress.start(files=4, size=4 * 1024**2)
        progress.sent(2 * 1024**2)
        progress.files_done(2)
        progress.clear()
    assert "\rdispatch: sending [###############               ]  50% 2.0/4.0 MB, 0/4 files" in shown.getvalue()
    assert shown.getvalue().endswith("\r\033[K") and piped.getvalue() == ""
