"""agent.py's input handling without a server: hostile zips, caps, working directories, plain files."""

from __future__ import annotations

import io
import os
import stat
import zipfile
from pathlib import Path

import pytest

import agent


def zip_file(tmp_path: Path, entries: list, name: str = "input.zip") -> Path:
    """Write a zip of [(name, content)] or [(name, content, unix mode)] entries, in that order."""
    path = tmp_path / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for entry in entries:
            entry_name, content, mode = entry if len(entry) == 3 else (*entry, 0o644 | stat.S_IFREG)
            info = zipfile.ZipInfo(entry_name)
            info.external_attr = mode << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, content)
    return path


@pytest.fixture
def dest(tmp_path) -> Path:
    path = tmp_path / "job"
    path.mkdir()
    return path


def files_under(path: Path) -> list:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_a_plain_zip_extracts_with_directories_and_executable_bits(tmp_path, dest):
    archive = zip_file(tmp_path, [("proj/", b""), ("proj/run.sh", b"#!/bin/sh\necho hi\n", 0o755 | stat.S_IFREG),
                                  ("proj/src/a.txt", "h\u00e9llo"), ("./proj/./b.txt", b"b")])

    agent.extract_zip(archive, dest)

    assert files_under(dest) == ["proj", "proj/b.txt", "proj/run.sh", "proj/src", "proj/src/a.txt"]
    assert (dest / "proj/src/a.txt").read_text("utf-8") == "h\u00e9llo"
    if os.name != "nt":
        assert os.access(dest / "proj/run.sh", os.X_OK)
        assert not os.access(dest / "proj/src/a.txt", os.X_OK)


@pytest.mark.parametrize("name, reason", [
    ("../evil.txt", "climbs out with '..'"),
    ("ok/../../evil.txt", "climbs out with '..'"),
    ("/tmp/evil.txt", "is an absolute path"),
    ("C:/evil.txt", "starts with a drive letter"),
    ("c:evil.txt", "starts with a drive letter"),
    ("..\\evil.txt", "contains a backslash"),
    ("ok\\..\\..\\evil.txt", "contains a backslash"),
])
def test_an_entry_that_could_leave_the_job_dir_fails_before_anything_is_written(tmp_path, dest, name, reason):
    # The harmless entry comes first: every entry is checked before the first byte is written.
    archive = zip_file(tmp_path, [("first.txt", b"fine"), (name, b"pwned")])

    with pytest.raises(agent.UnsafeArchive) as caught:
        agent.extract_zip(archive, dest)

    assert str(caught.value) == f"unsafe archive: entry {name!r} {reason}"
    assert files_under(dest) == []
    assert not (tmp_path / "evil.txt").exists()


def test_a_symlink_entry_fails(tmp_path, dest):
    archive = zip_file(tmp_path, [("passwd", b"/etc/passwd", 0o777 | stat.S_IFLNK)])

    with pytest.raises(agent.UnsafeArchive, match="entry 'passwd' is a symbolic link"):
        agent.extract_zip(archive, dest)

    assert files_under(dest) == []


def test_more_entries_than_the_cap_fail(tmp_path, dest):
    archive = zip_file(tmp_path, [(f"f{n}.txt", b"x") for n in range(4)])

    with pytest.raises(agent.UnsafeArchive, match="the zip has 4 entries, more than the limit of 3"):
        agent.extract_zip(archive, dest, max_entries=3)


def test_a_zip_bomb_stops_at_the_byte_cap(tmp_path, dest):
    archive = zip_file(tmp_path, [("a.bin", b"\0" * 600_000), ("b.bin", b"\0" * 600_000)])
    assert archive.stat().st_size < 10_000  # it compresses to almost nothing

    with pytest.raises(agent.UnsafeArchive, match="expands to more than the limit of 1000000 bytes"):
        agent.extract_zip(archive, dest, max_bytes=1_000_000)

    assert sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) <= 1_000_000


def test_a_corrupt_zip_fails_the_job_with_a_reason(tmp_path, dest):
    path = tmp_path / "broken.zip"
    path.write_bytes(b"PK\x03\x04 this is not really a zip")

    with pytest.raises(agent.JobSetupError, match="could not extract the zip"):
        agent.extract_zip(path, dest)


def test_a_file_and_a_directory_of_the_same_name_fail_cleanly(tmp_path, dest):
    archive = zip_file(tmp_path, [("a", b"file"), ("a/b.txt", b"inside")])

    with pytest.raises(agent.JobSetupError, match="could not extract the zip"):
        agent.extract_zip(archive, dest)


def test_a_non_zip_input_is_placed_as_it_is(tmp_path, dest):
    source = tmp_path / "download"
    source.write_bytes(b"\x00\x01 raw bytes")

    agent._place_input(source, "data.bin", dest)

    assert (dest / "data.bin").read_bytes() == b"\x00\x01 raw bytes"


def test_input_names_come_from_the_url_and_are_made_safe():
    assert agent._input_name("http://lanbox:3000/uploads/file-1/project.zip") == "project.zip"
    assert agent._input_name("http://lanbox:3000/uploads/file-1/my%20notes%2F..%2Fx.txt") == "my_notes_.._x.txt"
    assert agent._input_name("http://lanbox:3000/uploads/file-1/..") == "input"


@pytest.mark.parametrize("relative", ["../", "proj/../..", "/etc", "link"])
def test_the_working_directory_may_not_leave_the_job_dir(dest, relative):
    (dest / "proj").mkdir()
    if os.name != "nt":
        (dest / "link").symlink_to("/etc")

    with pytest.raises(agent.JobSetupError, match="points outside the job's files"):
        agent._working_dir(dest, relative)


def test_the_working_directory_must_exist(dest):
    (dest / "proj").mkdir()

    assert agent._working_dir(dest, "proj") == (dest / "proj").resolve()
    assert agent._working_dir(dest, None) == dest.resolve()
    with pytest.raises(agent.JobSetupError, match="is not a directory in the job's files"):
        agent._working_dir(dest, "missing")


def test_the_download_cache_fetches_a_file_once_and_evicts_the_oldest(tmp_path):
    cache = agent._DownloadCache(tmp_path, max_bytes=250)
    downloads = []

    def download(content: bytes):
        def write(out: io.BufferedWriter) -> None:
            downloads.append(content)
            out.write(content)
        return write

    for key in ("file-a", "file-a", "file-b", "file-c"):
        with cache.fetch(key, download(key.encode() * 20)) as path:  # 120 bytes each
            assert path.read_bytes() == key.encode() * 20

    assert [d[:6] for d in downloads] == [b"file-a", b"file-b", b"file-c"]
    assert sorted(p.name for p in tmp_path.glob("*.bin")) == ["file-b.bin", "file-c.bin"]


def test_an_uncacheable_download_is_deleted_after_use(tmp_path):
    cache = agent._DownloadCache(tmp_path)

    with cache.fetch(None, lambda out: out.write(b"once")) as path:
        assert path.read_bytes() == b"once"

    assert list(tmp_path.iterdir()) == []
