"""`agent.py run` and artifacts (issue 13), measured on loopback with real processes.

    python bench/transfer.py                                  # 200 MB in 10,000 files; 500 MB artifacts
    python bench/transfer.py --files 10000 --mb 200 --artifacts-mb 500 --runs 3 [--git] [--keep]

What it measures (one real dispatch.py, one real agent.py, the client as `python agent.py run`):
- first run of the tree: the client's upload rate (what it sent, from its first blob request to the
  last answer, as it prints it), and the whole run from the client's start to its exit;
- second run, after one file changed: the bytes the server received (its dispatch_upload_bytes
  counter on /metrics) and how long after the client's start the command started on the desktop
  (the command's first act is `date +%s.%N` into a file);
- artifacts: a job writes N MB of random bytes and names them as artifacts; the peak RSS growth of
  the agent and of the server (VmHWM reset through /proc/<pid>/clear_refs before, read after,
  checked against 50 ms samples) and of the client while it downloads and unpacks them.
Figures only: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from _common import (ROOT, Agents, DispatchServer, RssSampler, Workspace, api_call, fmt_range, login, parse_iso,
                     peak_rss_mb, print_banner, reset_peak_rss, rss_mb, wait_for_workers)


def make_tree(folder: Path, files: int, mb: int, git: bool) -> None:
    """`files` files of random bytes, `mb` MB in all, 100 to a folder."""
    size = mb * 1024 * 1024 // files
    for i in range(files):
        path = folder / f"d{i // 100:03d}" / f"f{i:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
    if git:
        run = lambda *a: subprocess.run(["git", *a], cwd=folder, check=True, capture_output=True)  # noqa: E731
        run("init", "-q")
        run("add", ".")
        run("-c", "user.name=b", "-c", "user.email=b@example.com", "commit", "-qm", "tree")


def uploaded_bytes(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(r"^dispatch_upload_bytes_total ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def run_client(server: DispatchServer, token: str, folder: Path, *args: str) -> tuple[subprocess.CompletedProcess,
                                                                                      float, float, float]:
    """The client's result, its wall time, the wall-clock moment it started, and its peak RSS (MB)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    env["DISPATCH_API_TOKEN"] = token
    started_at, started = time.time(), time.monotonic()
    process = subprocess.Popen([sys.executable, str(ROOT / "agent.py"), "run", "--server", server.url, *args],
                               cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with RssSampler(process.pid) as sampler:
        out, err = process.communicate(timeout=1800)
    result = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    if result.returncode != 0:
        raise RuntimeError(f"agent.py run exited with {result.returncode}:\n{err[-3000:]}")
    return result, time.monotonic() - started, started_at, sampler.max


def sent_line(stderr: str) -> str:
    match = re.search(r"sent (\d+) file\(s\), ([0-9.]+) MB in ([0-9.]+) s \(([0-9]+) MB/s\)", stderr)
    return match.group(0) if match else "sent nothing"


def agents_log(ws: Path) -> str:
    return "".join(path.read_text(errors="replace") for path in (ws / "agents").glob("*.log"))


def mode_tree(args, server: DispatchServer, token: str, ws: Path, run: int) -> dict:
    folder = ws / f"tree-{run}"
    folder.mkdir()
    t0 = time.monotonic()
    make_tree(folder, args.files, args.mb, args.git)
    made = time.monotonic() - t0
    stamp = ws / f"started-{run}"
    command = f"date +%s.%N > {stamp}"

    before = uploaded_bytes(server.url)
    first, first_wall, _, _ = run_client(server, token, folder, "--", command)
    first_bytes = uploaded_bytes(server.url) - before
    rate = float(re.search(r"\((\d+) MB/s\)", first.stderr).group(1)) if "MB/s" in first.stderr else float("nan")

    t0 = time.monotonic()  # what creating that many files costs on this disk just now, for reference
    subprocess.run(["cp", "-r", str(folder), str(ws / f"copy-{run}")], check=True)
    copied = time.monotonic() - t0
    changed = folder / "d000" / "f00000.bin"
    changed.write_bytes(os.urandom(changed.stat().st_size))
    before = uploaded_bytes(server.url)
    second, second_wall, second_start, _ = run_client(server, token, folder, "--", command)
    second_bytes = uploaded_bytes(server.url) - before
    command_started = float(stamp.read_text()) - second_start
    job_id = re.search(r"job (job-[0-9a-f]+) queued", second.stderr).group(1)
    _, body = api_call(server.url, "GET", f"/api/jobs/status?jobId={job_id}", token=token)
    placed = re.search(rf"^(\S+ \S+) INFO job {job_id}: \d+ input files in place", agents_log(ws), re.M)
    placed_at = time.mktime(time.strptime(placed.group(1)[:19], "%Y-%m-%d %H:%M:%S")) + int(placed.group(1)[20:]) / 1000
    steps = (f"submitted {parse_iso(body['job']['createdAt']) - second_start:.2f} s, claimed "
             f"{parse_iso(body['job']['startedAt']) - second_start:.2f} s, files in place "
             f"{placed_at - second_start:.2f} s")

    git = ", git" if args.git else ""
    print(f"run {run + 1}: tree of {args.files} files, {args.mb} MB (made in {made:.1f} s{git}; "
          f"cp -r of it just before the second run: {copied:.2f} s)\n"
          f"  first run:  {sent_line(first.stderr)}; server received {first_bytes / 2**20:.1f} MB; "
          f"client start to exit {first_wall:.2f} s\n"
          f"  second run: {sent_line(second.stderr)}; server received {second_bytes / 1024:.1f} KB; "
          f"the command started {command_started:.2f} s after the client started ({steps}); client start to exit "
          f"{second_wall:.2f} s", flush=True)
    return {"rate": rate, "second_kb": second_bytes / 1024, "start": command_started, "cp": copied}


def mode_artifacts(args, server: DispatchServer, agents: Agents, token: str, ws: Path, run: int) -> dict:
    folder = ws / f"artifacts-{run}"
    folder.mkdir()
    (folder / "README").write_text("artifacts bench\n")
    agent_pid, server_pid = agents.pids[0], server.pid
    rss0 = {"agent": rss_mb(agent_pid), "server": rss_mb(server_pid)}
    hwm = reset_peak_rss(agent_pid) and reset_peak_rss(server_pid)
    command = f"mkdir -p out && head -c {args.artifacts_mb}M /dev/urandom > out/big.bin"
    with RssSampler(agent_pid) as agent_samples, RssSampler(server_pid) as server_samples:
        result, wall, _, client_peak = run_client(server, token, folder, "--artifacts", "out/**", "--", command)
    peaks = {"agent": peak_rss_mb(agent_pid) if hwm else agent_samples.max,
             "server": peak_rss_mb(server_pid) if hwm else server_samples.max}
    size = (folder / "out" / "big.bin").stat().st_size
    growth = {name: peaks[name] - rss0[name] for name in peaks}
    print(f"run {run + 1}: {args.artifacts_mb} MB of artifacts ({size / 2**20:.0f} MB back in the folder) in "
          f"{wall:.1f} s: agent RSS {rss0['agent']:.1f} -> peak {peaks['agent']:.1f} MB (+{growth['agent']:.1f}; "
          f"sampled max {agent_samples.max:.1f}), server {rss0['server']:.1f} -> {peaks['server']:.1f} MB "
          f"(+{growth['server']:.1f}; sampled max {server_samples.max:.1f}), client peak {client_peak:.1f} MB",
          flush=True)
    (folder / "out" / "big.bin").unlink()
    return growth


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--artifacts-mb", type=int, default=500)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--git", action="store_true", help="make the tree a git work tree (git ls-files decides)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args()
    print_banner("agent.py run: a large tree, a second run, large artifacts")
    with Workspace(args.keep) as ws:
        server = DispatchServer(ws / "server", env={"DISPATCH_MAX_ARTIFACT_MB": str(args.artifacts_mb + 64)}).start()
        agents = None
        try:
            agents = Agents(ws / "agents", server.url, 1).start()
            admin = login(server.url)
            wait_for_workers(server.url, admin, agents.worker_ids())
            status, body = api_call(server.url, "POST", "/api/auth/tokens", {"name": "bench"}, token=admin)
            token = body["token"]
            # Artifacts first: the agent's RSS is then that of a fresh agent, not one that has placed trees.
            artifacts = [mode_artifacts(args, server, agents, token, ws, run) for run in range(args.runs)]
            trees = [mode_tree(args, server, token, ws, run) for run in range(args.runs)]
        finally:
            if agents:
                agents.stop()
            server.stop()
    print(f"summary: first-run upload {fmt_range([t['rate'] for t in trees])} MB/s; second run sent "
          f"{fmt_range([t['second_kb'] for t in trees], '{:.1f}')} KB, command started "
          f"{fmt_range([t['start'] for t in trees], '{:.2f}')} s after the client (cp -r of the tree: "
          f"{fmt_range([t['cp'] for t in trees], '{:.2f}')} s); artifacts RSS growth agent "
          f"{fmt_range([a['agent'] for a in artifacts], '{:.1f}')} MB, server "
          f"{fmt_range([a['server'] for a in artifacts], '{:.1f}')} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
