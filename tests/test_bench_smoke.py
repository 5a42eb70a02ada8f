"""Smoke runs of the bench scripts (the real benchmarks are not part of CI): they start, drive a
real server and real agents, and print their figures. Only requirements-dev packages are needed."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the bench reads /proc")]


def _run(*args: str, timeout: float = 90) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_throughput_smoke():
    output = _run("bench/throughput.py", "--jobs", "50", "--agents", "2", "--warmup", "4")
    assert "command: " in output and "machine: " in output
    assert re.search(r"\d+\.\d jobs/s", output), output
    assert re.search(r"CPU-s per 1,000 jobs .*server [\d.]+ drain .*agents\+jobs [\d.]+", output), output
    assert re.search(r"peak server RSS [\d.]+ MB", output), output


def test_chaos_smoke():
    output = _run("bench/chaos.py", "--cycles", "2", "--jobs", "30")
    assert re.search(r"acknowledged=30 lost=0 duplicated=0 orphaned=0", output), output


def test_farm_smoke():
    output = _run("bench/throughput.py", "--farm", "20", "--ramp", "1", "--settle", "0.5", "--duration", "1",
                  "--probes", "5", "--probe-interval", "0.05", timeout=60)
    assert re.search(r"steady state: 20 of 20 polls parked", output), output
    assert re.search(r"idle window .*server CPU [\d.]+% of a core.*RSS [\d.]+ MB", output), output
    assert re.search(r"\(5 jobs\): submit's start → job read by an agent p50 [\d.]+ ms", output), output
    assert re.search(r"the hard limit .* must be ≥ \d+ for 20 agents", output), output
