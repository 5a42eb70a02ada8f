"""agent.py's promise of Python 3.9 and of Windows, checked on any machine: vermin reads the file
for the newest feature it uses, and the Windows paths (the Job Object, cmd.exe through the
shell, taskkill, the lock, the memory size) run against stand-ins at the seams the real calls
use (`_kernel32()`, `subprocess.Popen`, `subprocess.run`, `msvcrt`). The real Windows and macOS
runs are in .github/workflows/ci.yml."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import types
from pathlib import Path

import pytest

import agent

ROOT = Path(__file__).resolve().parent.parent  # not from conftest: these run without it (see ci.yml)


@pytest.mark.slow  # waits out real time (a long poll, a timeout, an interval)
def test_agent_py_needs_nothing_newer_than_python_3_9():
    run_vermin = "import sys, vermin; sys.exit(vermin.main())"
    result = subprocess.run([sys.executable, "-c", run_vermin, "--no-tips", "--violations", "-t=3.9-",
                             str(ROOT / "agent.py")], capture_output=True, text=True)

    assert result.returncode == 0, result.stdout + result.stderr


class FakeKernel32:
    """Records the Job Object calls; each answers success unless told otherwise."""

    def __init__(self, assign_ok: bool = True):
        self.calls = []
        self.assign_ok = assign_ok
        self.limit_flags = None

    def CreateJobObjectW(self, security, name):
        self.calls.append(("CreateJobObjectW", security, name))
        return 4242

    def SetInformationJobObject(self, handle, info_class, info, size):
        self.limit_flags = info._obj.BasicLimitInformation.LimitFlags
        self.calls.append(("SetInformationJobObject", handle, info_class, size))
        return 1

    def AssignProcessToJobObject(self, handle, process):
        self.calls.append(("AssignProcessToJobObject", handle, process))
        return 1 if self.assign_ok else 0

    def TerminateJobObject(self, handle, code):
        self.calls.append(("TerminateJobObject", handle, code))
        return 1

    def CloseHandle(self, handle):
        self.calls.append(("CloseHandle", handle))
        return 1

    def GlobalMemoryStatusEx(self, status):
        status._obj.ullTotalPhys = 16 * 2**30
        return 1


class FakePopen:
    pid = 777
    _handle = 9000


@pytest.fixture
def windows(monkeypatch):
    """agent.py as on Windows, with a stand-in kernel32."""
    kernel32 = FakeKernel32()
    monkeypatch.setattr(agent, "_WINDOWS", True)
    monkeypatch.setattr(agent, "_kernel32", lambda: kernel32)
    monkeypatch.setattr(ctypes, "WinError", lambda code=None: OSError(code, "windows error"), raising=False)
    monkeypatch.setattr(ctypes, "get_last_error", lambda: 5, raising=False)
    return kernel32


def test_the_structures_have_their_64_bit_windows_sizes():
    if ctypes.sizeof(ctypes.c_void_p) != 8:
        pytest.skip("the sizes below are those of 64-bit Windows")
    assert ctypes.sizeof(agent._JOBOBJECT_EXTENDED_LIMIT_INFORMATION) == 144
    assert ctypes.sizeof(agent._MEMORYSTATUSEX) == 64


def test_each_job_goes_into_a_job_object_that_dies_with_the_agent_and_is_terminated_whole(windows):
    tree = agent._ProcessTree(FakePopen(), "marker/")

    assert [call[0] for call in windows.calls] == ["CreateJobObjectW", "SetInformationJobObject",
                                                  "AssignProcessToJobObject"]
    assert windows.limit_flags == agent._JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
    assert windows.calls[1][2] == agent._JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS
    assert windows.calls[2] == ("AssignProcessToJobObject", 4242, 9000)
    tree.kill()
    assert windows.calls[-2:] == [("TerminateJobObject", 4242, 1), ("CloseHandle", 4242)]


def test_without_a_job_object_the_tree_is_killed_with_taskkill(windows, monkeypatch):
    windows.assign_ok = False
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda args, **kwargs: ran.append(args))
    tree = agent._ProcessTree(FakePopen(), "marker/")

    tree.kill()

    assert ("CloseHandle", 4242) in windows.calls  # the unused Job Object is not leaked
    assert ran == [["taskkill", "/T", "/F", "/PID", "777"]]


def test_a_command_runs_through_the_shell_in_its_own_process_group(windows, monkeypatch, tmp_path):
    started = {}
    monkeypatch.setattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200, raising=False)
    monkeypatch.setattr(subprocess, "Popen", lambda command, **kwargs: started.update(command=command, **kwargs))

    agent._spawn("npm test", tmp_path, {"PATH": "x"})

    # shell=True is `%COMSPEC% /c npm test` (cmd.exe) on Windows; the group keeps Ctrl-C away from it.
    assert (started["command"], started["shell"], started["creationflags"]) == ("npm test", True, 0x200)
    assert "start_new_session" not in started


def test_the_work_dir_lock_uses_msvcrt_and_a_second_agent_is_refused(windows, monkeypatch, tmp_path):
    held = set()

    def locking(fd, mode, size):
        if held:
            raise OSError(13, "locked")
        held.add(fd)

    monkeypatch.setitem(sys.modules, "msvcrt", types.SimpleNamespace(LK_NBLCK=2, locking=locking))
    first = agent._lock_work_dir(tmp_path)
    try:
        with pytest.raises(agent.AgentError, match="another agent is already using"):
            agent._lock_work_dir(tmp_path)
    finally:
        first.close()


def test_the_memory_size_comes_from_global_memory_status(windows):
    assert agent._total_memory_mb() == 16 * 1024
