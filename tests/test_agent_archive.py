"""agent.py's input handling without a server: hostile zips, caps, working directories, plain files."""

from __future__ import annotations

import io
import os
import stat
import struct
import time
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


def directory_only_zip(path: Path, entries: int, *, claim: int, zip64_claim: int | None = None) -> Path:
    """A zip of `entries` minimal central-directory entries (no file data), whose classic end record
    claims `claim` entries and, with `zip64_claim`, a ZIP64 end record that claims that many."""
    entry = struct.pack("<4s4B4HL2L5H2L", b"PK\1\2", 20, 3, 20, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0) + b"a"
    directory = entry * entries
    with open(path, "wb") as f:
        f.write(directory)
        if zip64_claim is not None:
            f.write(struct.pack("<4sQ2H2L4Q", b"PK\6\6", 44, 45, 45, 0, 0, zip64_claim, zip64_claim,
                                len(directory), 0))
            f.write(struct.pack("<4sLQL", b"PK\6\7", 0, len(directory), 1))
        f.write(struct.pack("<4s4H2LH", b"PK\5\6", 0, 0, min(claim, 0xFFFF), min(claim, 0xFFFF),
                            min(len(directory), 0xFFFFFFFF), 0, 0))
    return path


@pytest.fixture
def no_zipfile(monkeypatch):
    """zipfile.ZipFile fails the test if anything builds one: the refusal must come first."""
    def built(*args, **kwargs):
        raise AssertionError("zipfile.ZipFile was built before the entry count was checked")

    monkeypatch.setattr(agent.zipfile, "ZipFile", built)


@pytest.mark.parametrize("claim", [0xFFFF, 1], ids=["zip64 record", "zip64 record behind a small classic one"])
def test_a_zip_that_claims_millions_of_entries_is_refused_from_its_end_records(tmp_path, dest, no_zipfile, claim):
    archive = directory_only_zip(tmp_path / "claims.zip", 3, claim=claim, zip64_claim=3_000_000)

    with pytest.raises(agent.UnsafeArchive, match="the zip has 3000000 entries, more than the limit of 100000"):
        agent.extract_zip(archive, dest)


def test_a_zip_holding_a_million_entries_behind_a_small_claim_is_refused_quickly(tmp_path, dest, no_zipfile):
    archive = directory_only_zip(tmp_path / "million.zip", 1_000_000, claim=5)
    assert archive.stat().st_size < agent.MAX_ZIP_DIRECTORY_BYTES  # only counting tells

    started = time.monotonic()
    with pytest.raises(agent.UnsafeArchive, match="more entries than the limit of 100000 .its end record says 5."):
        agent.extract_zip(archive, dest)

    assert time.monotonic() - started < 2  # zipfile itself takes ~10 s and ~300 MB for this
    assert files_under(dest) == []


def test_a_central_directory_over_its_byte_cap_is_refused(tmp_path, dest, no_zipfile):
    archive = directory_only_zip(tmp_path / "wide.zip", 100, claim=100)

    with pytest.raises(agent.UnsafeArchive, match="central directory has 4700 bytes, more than the limit of 4000"):
        agent.extract_zip(archive, dest, max_directory_bytes=4000)


def test_a_real_zip64_archive_and_one_with_a_comment_still_extract(tmp_path, dest, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 2)  # so three entries get ZIP64 end records
        archive = zip_file(tmp_path, [(f"f{n}.txt", f"{n}") for n in range(3)])
    assert b"PK\6\6" in archive.read_bytes()
    with zipfile.ZipFile(tmp_path / "commented.zip", "w") as commented:
        commented.writestr("c.txt", "c")
        commented.comment = b"built by a test " * 100

    agent.extract_zip(archive, dest)
    agent.extract_zip(tmp_path / "commented.zip", dest)

    assert files_under(dest) == ["c.txt", "f0.txt", "f1.txt", "f2.txt"]
    with pytest.raises(agent.UnsafeArchive, match="the zip has 3 entries, more than the limit of 2"):
        agent.extract_zip(archive, tmp_path, max_entries=2)


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
