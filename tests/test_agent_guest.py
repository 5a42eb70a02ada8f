"""agent.py as a good guest on someone's desktop, without dispatch.py: the policy flags, the guest's
verdicts with a test playing the owner, the idle and power probes (Linux's on fake /dev/input
and /sys/class/power_supply directories, X11 on Xvfb when it is installed; the Windows and macOS
ones on their parsing and against stand-ins), how a job steps aside, and the heartbeat."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest

import agent
import test_agent_run

fake, make_agent = test_agent_run.fake, test_agent_run.make_agent  # its fake server and agents (fixtures)

BASE = ["--server", "http://lanbox:3000", "--token", "t"]


def config(*argv: str, environ: dict | None = None) -> agent.Config:
    return agent.parse_config([*BASE, *argv], environ or {})


def moment(hour: int, minute: int = 0) -> time.struct_time:
    return time.struct_time((2026, 1, 5, hour, minute, 0, 0, 5, -1))


def guest(cfg: agent.Config, idle: float | None = 3600.0, load: float = 0.0, on_battery: bool | None = False,
          at: time.struct_time = moment(20)) -> agent._Guest:
    """A guest whose owner was last seen `idle` seconds ago (None: nothing can tell)."""

    def probe():
        if idle is None:
            raise agent._Unknown("no DISPLAY")
        return idle

    def battery():
        if on_battery is None:
            raise agent._Unknown("pmset does not say")
        return on_battery

    return agent._Guest(cfg, idle_probes=(("test", probe),), load=lambda: load, on_battery=battery,
                        clock=lambda: at)


# --- flags ----------------------------------------------------------------------------------


def test_the_policy_comes_from_flags_or_the_environment_with_decimal_minutes():
    environ = {"DISPATCH_ONLY_WHEN_IDLE": "2.5", "DISPATCH_NOT_ON_BATTERY": "1", "DISPATCH_HOURS": "18:00-08:00",
               "DISPATCH_ON_OWNER_RETURN": "evict", "DISPATCH_IDLE_COMMAND": "cat /tmp/idle"}

    cfg = config("--hours", "12:00-13:30, 18:00-23:00", "--max-load", "1.5", "--evict-after", "0.5",
                 environ=environ)

    assert (cfg.only_when_idle, cfg.not_on_battery, cfg.on_owner_return, cfg.idle_command) == (
        2.5, True, "evict", "cat /tmp/idle")
    assert (cfg.hours, cfg.max_load, cfg.evict_after) == (((720, 810), (1080, 1380)), 1.5, 0.5)
    default = config()
    assert (default.only_when_idle, default.hours, default.max_load, default.on_owner_return, default.evict_after,
            default.not_on_battery, default.idle_command) == (0.0, (), None, "suspend", 10.0, False, None)
    assert config(environ={"DISPATCH_NOT_ON_BATTERY": "0"}).not_on_battery is False


@pytest.mark.parametrize("argv, environ, message", [
    (["--only-when-idle", "-1"], {}, "must be a number of at least 0"),
    (["--evict-after", "nan"], {}, "must be a number of at least 0"),
    (["--max-load", "high"], {}, "must be a number of at least 0"),
    (["--hours", "25:00-08:00"], {}, "must be hours such as 18:00-08:00"),
    (["--hours", "8-18"], {}, "must be hours such as 18:00-08:00"),
    (["--hours", "08:00-08:00"], {}, "must be hours such as 18:00-08:00"),
    (["--on-owner-return", "pause"], {}, "must be suspend, evict or finish"),
    ([], {"DISPATCH_ON_OWNER_RETURN": "pause"}, "must be suspend, evict or finish"),
])
def test_a_bad_policy_value_is_a_usage_error(argv, environ, message, capsys):
    with pytest.raises(SystemExit) as exited:
        config(*argv, environ=environ)

    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_hours_may_wrap_past_midnight_and_a_list_means_any_of_them():
    windows = config("--hours", "18:00-08:00,12:00-13:00").hours

    inside = [moment(18), moment(23, 59), moment(0), moment(7, 59), moment(12), moment(12, 59)]
    outside = [moment(8), moment(11, 59), moment(13), moment(17, 59)]
    assert [agent._within_hours(windows, m) for m in inside] == [True] * len(inside)
    assert [agent._within_hours(windows, m) for m in outside] == [False] * len(outside)


# --- the guest's verdicts -------------------------------------------------------------------------


def test_without_a_policy_jobs_are_always_taken_and_nothing_is_probed():
    cfg = config()
    nothing = agent._Guest(cfg, idle_probes=(), load=None, on_battery=None, clock=None)

    assert (nothing.policy, nothing.idle_probe(), nothing.standing()) == (None, None, agent._Standing())


def test_input_within_the_idle_time_means_the_owner_is_active():
    cfg = config("--only-when-idle", "10")

    assert guest(cfg, idle=599).standing() == agent._Standing("owner active", "owner active")
    assert guest(cfg, idle=600).standing() == agent._Standing()
    assert guest(cfg, idle=None).standing() == agent._Standing("idle time unknown", "idle time unknown")


def test_outside_the_hours_and_on_battery_jobs_step_aside_as_for_the_owner():
    hours, battery = config("--hours", "18:00-08:00"), config("--not-on-battery")

    assert guest(hours, at=moment(9)).standing() == agent._Standing("outside hours 18:00-08:00",
                                                                      "outside hours 18:00-08:00")
    assert guest(hours, at=moment(19)).standing() == agent._Standing()
    assert guest(battery, on_battery=True).standing() == agent._Standing("on battery", "on battery")
    assert guest(battery, on_battery=None).standing().paused == "power source unknown"
    assert guest(battery, on_battery=False).standing() == agent._Standing()


def test_load_that_is_not_our_jobs_stops_new_jobs_but_not_running_ones():
    cfg = config("--max-load", "2")

    assert guest(cfg, load=3.2).standing() == agent._Standing("load 3.2 > 2", None)
    assert guest(cfg, load=3.2).standing(our_load=2) == agent._Standing()  # 2 of the 3.2 are our jobs'
    assert guest(cfg, load=2.0).standing() == agent._Standing()


def test_the_owner_comes_first_then_the_hours_the_power_and_the_load():
    cfg = config("--only-when-idle", "1", "--hours", "18:00-08:00", "--not-on-battery", "--max-load", "0")

    everything = guest(cfg, idle=0, at=moment(9), on_battery=True, load=5)
    assert everything.standing().paused == "owner active"
    assert guest(cfg, at=moment(9), on_battery=True, load=5).standing().paused == "outside hours 18:00-08:00"
    assert guest(cfg, on_battery=True, load=5).standing().paused == "on battery"
    assert guest(cfg, load=5).standing().paused == "load 5 > 0"
    assert guest(cfg).policy == ("after 1 min without input, during 18:00-08:00, under load 0, not on battery; "
                                 "when the owner returns, a running job is suspended (and evicted after 10 min)")


def test_only_when_idle_refuses_to_start_when_nothing_can_tell_and_says_why(tmp_path):
    cfg = agent.Config(server="http://lanbox:3000", token="t", worker_id="desk-1", work_dir=tmp_path / "work",
                       only_when_idle=5, idle_command="exit 3")
    worker = agent.Agent(cfg)

    with pytest.raises(agent.AgentError) as refused:
        worker.prepare()

    assert str(refused.value) == (
        "--only-when-idle needs to know when this computer last had keyboard or mouse input, and nothing here "
        "can tell (--idle-command: exit 3 exited with code 3); give --idle-command")
    assert not cfg.work_dir.exists()  # refused before it touched anything
    blind = agent._Guest(cfg, idle_probes=(("X11", guest_probe_failing("no DISPLAY")),
                                           ("/dev/input", guest_probe_failing("/dev/input: No such file"))))
    with pytest.raises(agent.AgentError, match=r"\(X11: no DISPLAY; /dev/input: /dev/input: No such file\)"):
        blind.idle_probe()


def guest_probe_failing(reason: str):
    def probe():
        raise agent._Unknown(reason)
    return probe


def test_the_first_probe_that_can_tell_is_the_one_used():
    cfg = config("--only-when-idle", "1")
    probes = (("X11", guest_probe_failing("no DISPLAY")), ("logind", lambda: 5.0), ("/dev/input", lambda: 900.0))

    assert agent._Guest(cfg, idle_probes=probes).idle_probe() == "logind"
    assert agent._Guest(cfg, idle_probes=probes).standing().paused == "owner active"


# --- the probes -----------------------------------------------------------------------------------


def test_the_idle_command_prints_the_seconds_since_the_last_input():
    assert agent._command_idle_seconds("echo 42.5") == 42.5
    assert agent._command_idle_seconds("echo 7 seconds") == 7.0
    for command, says in [("echo soon", "printed 'soon'"), ("echo -3", "printed '-3'"), ("exit 4", "code 4")]:
        with pytest.raises(agent._Unknown, match=says):
            agent._command_idle_seconds(command)


def test_the_idle_command_alone_is_asked_when_given(monkeypatch):
    [(name, probe)] = agent._idle_probes("echo 12")
    assert (name, probe()) == ("--idle-command", 12.0)
    monkeypatch.setattr(agent, "_WINDOWS", True)
    assert [name for name, _ in agent._idle_probes(None)] == ["GetLastInputInfo"]
    monkeypatch.setattr(agent, "_WINDOWS", False)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert [name for name, _ in agent._idle_probes(None)] == ["ioreg"]
    monkeypatch.setattr(sys, "platform", "linux")
    assert [name for name, _ in agent._idle_probes(None)] == ["X11", "logind", "/dev/input"]


def test_input_devices_tell_the_time_of_the_newest_input(tmp_path):
    now = time.time()
    for name, seconds_ago in (("event0", 500), ("event1", 30), ("mice", 900)):
        (tmp_path / name).touch()
        os.utime(tmp_path / name, (now - seconds_ago, now - seconds_ago - 1000))
    (tmp_path / "by-id").mkdir()  # links to the same devices: directories are skipped

    assert agent._input_devices_idle_seconds(tmp_path, now=now) == pytest.approx(30)
    os.utime(tmp_path / "mice", (now - 900, now - 2))  # a newer modification counts too
    assert agent._input_devices_idle_seconds(tmp_path, now=now) == pytest.approx(2)
    with pytest.raises(agent._Unknown, match="holds no input devices"):
        agent._input_devices_idle_seconds(tmp_path / "by-id")
    with pytest.raises(agent._Unknown, match=re.escape(str(tmp_path / "missing"))):
        agent._input_devices_idle_seconds(tmp_path / "missing")


def test_logind_says_whether_a_session_is_in_use_and_since_when_all_are_idle():
    assert agent._logind_idle("IdleHint=yes\nIdleSinceHint=1700000000000000\n", now=1700000100.0) == 100.0
    assert agent._logind_idle("IdleHint=no\nIdleSinceHint=1700000000000000\n", now=1700000100.0) == 0.0
    with pytest.raises(agent._Unknown, match="no IdleHint"):
        agent._logind_idle("", now=0.0)


IOREG = """+-o IOHIDSystem  <class IOHIDSystem, id 0x100000465, registered, matched, active, busy 0 (0 ms), retain 21>
    {
      "IOClass" = "IOHIDSystem"
      "HIDIdleTime" = 93500000000
      "HIDParameters" = {"HIDKeyRepeat"=83333333,"HIDIdleTime"=120000000000}
      "IOProviderClass" = "IOResources"
    }
"""


def test_macos_idle_time_is_hid_idle_time_in_nanoseconds():
    assert agent._hid_idle_seconds(IOREG) == 93.5  # the newest input, of the values shown
    with pytest.raises(agent._Unknown, match="no HIDIdleTime"):
        agent._hid_idle_seconds('"IOClass" = "IOHIDSystem"')


def test_macos_power_source_from_pmset():
    on_battery = "Now drawing from 'Battery Power'\n -InternalBattery-0 (id=1234)\t87%; discharging;\n"
    assert agent._pmset_on_battery(on_battery) is True
    assert agent._pmset_on_battery("Now drawing from 'AC Power'\n -InternalBattery-0\t100%; charged;\n") is False
    assert agent._pmset_on_battery("Now drawing from 'UPS Power'\n") is True
    with pytest.raises(agent._Unknown):
        agent._pmset_on_battery("")


def supplies(root, **entries):
    for name, fields in entries.items():
        (root / name).mkdir(parents=True)
        for field, value in fields.items():
            (root / name / field).write_text(value + "\n")
    return root


def test_linux_power_source_from_sys_class_power_supply(tmp_path):
    unplugged = supplies(tmp_path / "a", AC={"type": "Mains", "online": "0"},
                         BAT0={"type": "Battery", "status": "Discharging"})
    plugged = supplies(tmp_path / "b", AC={"type": "Mains", "online": "1"}, BAT0={"type": "Battery", "status": "Full"})
    mouse = supplies(tmp_path / "c", hidpp_battery_0={"type": "Battery", "status": "Discharging"},
                     ADP1={"type": "Mains", "online": "1"})
    assert agent._linux_on_battery(unplugged) is True
    assert agent._linux_on_battery(plugged) is False
    assert agent._linux_on_battery(mouse) is False  # a wireless mouse's battery is not the computer's power
    assert agent._linux_on_battery(tmp_path / "a desktop has none") is False


def test_windows_ticks_wrap_around_and_the_structures_have_their_windows_sizes():
    assert agent._ticks_between(1000, 61000) == 60.0
    assert agent._ticks_between(2**32 - 500, 1500) == 2.0  # GetTickCount wrapped after 49.7 days
    assert ctypes.sizeof(agent._LASTINPUTINFO) == 8
    assert ctypes.sizeof(agent._SYSTEM_POWER_STATUS) == 12
    assert ctypes.sizeof(agent._FILETIME) == 8


def test_windows_busy_processors_come_from_system_times():
    # (idle, kernel, user) in 100 ns: kernel time includes idle time.
    assert agent._busy_processors((0, 0, 0), (300, 400, 400), 4) == 4 * (800 - 300) / 800
    assert agent._busy_processors((5, 5, 5), (5, 5, 5), 4) == 0.0


class FakeWindows:
    """kernel32, user32 and ntdll as the probes and the job suspension call them."""

    def __init__(self):
        self.ac_line, self.last_input, self.ticks = 0, 1000, 61000
        self.job_pids, self.calls = [11, 12], []

    def GetSystemPowerStatus(self, status):
        status._obj.ACLineStatus = self.ac_line
        return 1

    def GetLastInputInfo(self, info):
        info._obj.dwTime = self.last_input
        return 1

    def GetTickCount(self):
        return self.ticks

    def QueryInformationJobObject(self, handle, info_class, ids, size, returned):
        assert info_class == agent._JOB_OBJECT_BASIC_PROCESS_ID_LIST_CLASS
        ids._obj.NumberOfProcessIdsInList = len(self.job_pids)
        for i, pid in enumerate(self.job_pids):
            ids._obj.ProcessIdList[i] = pid
        return 1

    def OpenProcess(self, access, inherit, pid):
        assert access == agent._PROCESS_SUSPEND_RESUME
        return 1000 + pid

    def NtSuspendProcess(self, process):
        self.calls.append(("suspend", process))
        if process == 1011:
            self.job_pids = [11, 12, 13]  # 11 started 13 before it was suspended

    def NtResumeProcess(self, process):
        self.calls.append(("resume", process))

    def CloseHandle(self, handle):
        return 1


@pytest.fixture
def windows(monkeypatch):
    stand_in = FakeWindows()
    monkeypatch.setattr(agent, "_WINDOWS", True)
    monkeypatch.setattr(agent, "_kernel32", lambda: stand_in)
    monkeypatch.setattr(agent, "_ntdll", lambda: stand_in)
    monkeypatch.setattr(ctypes, "WinDLL", lambda name, **kwargs: stand_in, raising=False)
    return stand_in


def test_windows_idle_time_and_power_source(windows):
    assert agent._windows_idle_seconds() == 60.0
    assert agent._on_battery() is True
    windows.ac_line = 1
    assert agent._on_battery() is False
    windows.ac_line = 255  # unknown: a desktop without a battery
    assert agent._on_battery() is False


def test_windows_suspends_each_process_of_the_job_once_including_one_started_meanwhile(windows):
    job = object.__new__(agent._WindowsJob)
    job._handle, job._suspended = 4242, set()

    assert job.suspend() is True
    job.resume()

    suspended = sorted(p for call, p in windows.calls if call == "suspend")
    resumed = sorted(p for call, p in windows.calls if call == "resume")
    assert suspended == resumed == [1011, 1012, 1013]


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("Xvfb"), reason="Xvfb is not installed (apt-get install xvfb)")
def test_x11_idle_time_on_a_real_display_grows_and_input_resets_it(monkeypatch):
    if agent._xlib() is None:
        pytest.skip("libX11 or libXss is not installed")
    display = f":{os.getpid() % 1000 + 100}"
    server = subprocess.Popen(["Xvfb", display, "-screen", "0", "320x240x24"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        monkeypatch.setenv("DISPLAY", display)
        monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
        monkeypatch.delenv("XDG_SESSION_TYPE", raising=False)
        deadline = time.monotonic() + 10
        while True:
            try:
                first = agent._x11_idle_seconds()
                break
            except agent._Unknown:
                assert time.monotonic() < deadline, "Xvfb did not start"
                time.sleep(0.1)
        time.sleep(1.0)
        assert agent._x11_idle_seconds() >= first + 0.9
        move_the_mouse(display)
        assert agent._x11_idle_seconds() < 0.5
        monkeypatch.setenv("XDG_SESSION_TYPE", "wayland")
        with pytest.raises(agent._Unknown, match="Wayland"):
            agent._x11_idle_seconds()
    finally:
        server.terminate()
        server.wait(10)


def move_the_mouse(display: str) -> None:
    """Input as the X server sees it: the XTest extension moves the pointer."""
    x11 = agent._xlib()[0]
    try:
        xtst = ctypes.CDLL("libXtst.so.6")
    except OSError:
        pytest.skip("libXtst is not installed")
    xtst.XTestFakeMotionEvent.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_ulong)
    x11.XFlush.argtypes = (ctypes.c_void_p,)
    connection = x11.XOpenDisplay(display.encode())
    xtst.XTestFakeMotionEvent(connection, -1, 10, 10, 0)
    x11.XFlush(connection)
    x11.XCloseDisplay(connection)


@pytest.mark.skipif(not agent._WINDOWS, reason="the real GetLastInputInfo and GetSystemPowerStatus: Windows (CI)")
def test_the_windows_probes_answer_on_windows():
    assert agent._windows_idle_seconds() >= 0
    assert agent._on_battery() in (True, False)
    assert agent._ProcessorLoad()() >= 0


@pytest.mark.skipif(sys.platform != "darwin", reason="the real ioreg and pmset: macOS (CI)")
def test_the_macos_probes_answer_on_macos():
    assert agent._macos_idle_seconds() >= 0
    assert agent._on_battery() in (True, False)


def test_x11_is_not_asked_without_a_display(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    with pytest.raises(agent._Unknown, match="no DISPLAY"):
        agent._x11_idle_seconds()


# --- stepping aside -------------------------------------------------------------------------------


class FakeTree:
    def __init__(self, can_suspend: bool = True):
        self.can_suspend = can_suspend
        self.calls = []

    def suspend(self) -> bool:
        self.calls.append("suspend")
        return self.can_suspend

    def resume(self) -> None:
        self.calls.append("resume")


class Owner:
    def __init__(self):
        self.why = None

    def __call__(self):
        return self.why


def test_a_suspended_job_resumes_when_the_owner_leaves_and_its_time_suspended_adds_up():
    owner, tree = Owner(), FakeTree()
    aside = agent._StepAside(owner, "suspend", evict_after=600)

    assert aside.step(tree, now=10.0) is None and not aside.suspended
    owner.why = "owner active"
    assert aside.step(tree, now=11.0) is None and aside.suspended
    assert aside.step(tree, now=12.0) is None and tree.calls == ["suspend"]  # once, not every step
    assert aside.suspended_for(now=15.0) == 4.0
    owner.why = None
    assert aside.step(tree, now=20.0) is None and not aside.suspended
    owner.why = "on battery"
    aside.step(tree, now=30.0)
    assert aside.suspended_for(now=32.0) == 11.0
    assert tree.calls == ["suspend", "resume", "suspend"]


def test_a_job_suspended_past_evict_after_is_evicted():
    owner, tree = Owner(), FakeTree()
    aside = agent._StepAside(owner, "suspend", evict_after=30)
    owner.why = "owner active"
    aside.step(tree, now=0.0)

    assert aside.step(tree, now=29.9) is None
    assert aside.step(tree, now=30.0) == "suspended for more than 0.5 min (owner active)"


def test_evict_gives_the_job_back_at_once_and_finish_lets_it_run():
    owner = Owner()
    owner.why = "outside hours 18:00-08:00"

    assert agent._StepAside(owner, "evict").step(FakeTree(), now=0.0) == "outside hours 18:00-08:00"
    finish, tree = agent._StepAside(owner, "finish"), FakeTree()
    assert finish.step(tree, now=0.0) is None and not finish.suspended and tree.calls == []


def test_a_job_that_cannot_be_suspended_here_is_evicted_instead():
    owner = Owner()
    owner.why = "owner active"

    assert agent._StepAside(owner, "suspend").step(FakeTree(can_suspend=False), now=0.0) == "owner active"


# --- the agent: what it tells the server, when it asks for jobs ----------------------------------


def test_a_paused_agent_says_why_in_its_heartbeats_and_asks_for_no_job_until_the_owner_leaves(fake, make_agent):
    fake.route("GET", "/api/jobs/get-job", (204, {}, b""))
    worker = make_agent(fake.url, only_when_idle=1.0, idle_command="echo 0")
    owner = {"idle": 5.0}
    worker._guest = agent._Guest(worker.config, idle_probes=(("test", lambda: owner["idle"]),))

    assert worker.check_guest() == agent._Standing("owner active", "owner active")
    assert worker.poll_once() == agent.GUEST_CHECK_SECONDS
    [heartbeat] = fake.bodies("/api/workers/heartbeat")
    assert (heartbeat["state"], heartbeat["pausedReason"]) == ("paused", "owner active")
    assert fake.queries("/api/jobs/get-job") == []

    owner["idle"] = 60.0
    assert worker.check_guest() == agent._Standing()
    worker.heartbeat()
    assert 0 <= worker.poll_once() <= agent.POLL_FLOOR_SECONDS
    assert len(fake.queries("/api/jobs/get-job")) == 1
    assert (fake.bodies("/api/workers/heartbeat")[-1]["state"], fake.bodies("/api/workers/heartbeat")[-1][
        "pausedReason"]) == ("available", None)
    worker.request_stop()
    assert worker._heartbeat_body()["pausedReason"] == "draining"


def test_an_evicted_job_is_handed_back_with_why_and_is_not_counted_as_done(fake, make_agent, monkeypatch):
    fake.route("GET", "/api/jobs/get-job", agent_job_answer())
    worker = make_agent(fake.url, only_when_idle=1.0, on_owner_return="evict", idle_command="echo 600")
    owner = {"idle": 600.0}
    worker._guest = agent._Guest(worker.config, idle_probes=(("test", lambda: owner["idle"]),))
    worker.check_guest()
    monkeypatch.setattr(agent, "run_job", lambda *args, **kwargs: agent.JobResult(
        agent.EXIT_STOPPED, error="evicted (owner active); the process tree was killed", duration=1.0,
        evicted="owner active"))

    worker.poll_once()

    [result] = fake.bodies("/api/jobs/submit-result")
    assert (result["evicted"], result["exitCode"]) == ("owner active", agent.EXIT_STOPPED)
    assert worker._heartbeat_body()["jobsCompleted"] == 0


def agent_job_answer(**fields) -> tuple:
    job = {"jobId": "job-1", "command": "sleep 30", "fileUrl": None, "fileId": None, "sha256": None,
           "workingDirectory": None, "timeout": 60, "attempt": 1, "tags": [], **fields}
    return 200, {}, {"success": True, "job": job}


unix_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/bin/sh commands and /proc")


def state_of(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.slow
@unix_only
def test_run_job_stops_the_whole_tree_and_its_timeout_leaves_out_the_time_suspended(tmp_path):
    marker = f"test-{os.getpid()}/job/"
    owner = Owner()
    aside = agent._StepAside(owner, "suspend")
    sent = []

    def send(stream, text):
        sent.append((aside.suspended, stream, text))

    command = ("setsid sh -c 'sleep 0.6; echo child' & echo \"pids $$ $!\"; sleep 0.6; wait; echo parent done")
    owner.why = None
    result_box = {}

    def run():
        result_box["result"] = agent.run_job(command, tmp_path, env={**os.environ, agent.MARKER_ENV: marker},
                                             marker=marker, timeout=1.5, send_output=send,
                                             halt=threading.Event(), step_aside=aside)

    runner = threading.Thread(target=run)
    runner.start()
    deadline = time.monotonic() + 5
    while not any("pids" in text for _, _, text in sent):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    owner.why = "owner active"
    deadline = time.monotonic() + 2
    while not aside.suspended:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    pids = agent._marked_pids(marker)
    assert len(pids) >= 3 and {state_of(pid) for pid in pids} == {"T"}
    time.sleep(2.0)  # longer than the timeout: suspended time does not count
    owner.why = None
    runner.join(10)

    result = result_box["result"]
    streamed = "".join(text for _, stream, text in sent if stream == "stdout") + result.stdout
    assert (result.exit_code, result.error, result.evicted) == (0, None, None)
    assert streamed.endswith("child\nparent done\n")
    assert (True, "stdout", "") in sent and sent[-1][0] is False  # the server heard of both changes at once
