#!/usr/bin/env python3
"""Summarise a py-spy ``--format raw`` profile (collapsed stacks): the functions with the most
samples on top of the stack (self) and anywhere in it (inclusive), as percentages.

    python bench/profile_summary.py /tmp/prof/server.txt [--top 25] [--thread-filter aiosqlite]
"""

from __future__ import annotations

import argparse
import collections
import re
import sys


# Leaf frames that are a thread waiting, not working (py-spy's idle detection misses some).
IDLE_LEAVES = (
    r"^EpollSelector\.select \(.*selectors\.py",
    r"^_connection_worker_thread \(.*core\.py:59\)",  # aiosqlite's thread waiting for work: tx.get()
    r"^_worker \(.*concurrent/futures/thread\.py",
    r"^Condition\.wait \(",
    r"^Event\.wait \(",
)


def load(path: str):
    stacks = []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            frames, _, count = line.rpartition(" ")
            stacks.append((frames.split(";"), int(count)))
    return stacks


def short(frame: str, lines: bool = False) -> str:
    """'name (path/to/file.py:123)' -> 'name (file.py)' (or 'name (file.py:123)' with lines)."""
    m = re.match(r"(.*) \((.*?)(?::(\d+))?\)$", frame)
    if not m:
        return frame
    name, path, line = m.group(1), m.group(2), m.group(3)
    return f"{name} ({path.rsplit('/', 1)[-1]}{':' + line if lines and line else ''})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profile")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--grep", help="only stacks containing this text")
    p.add_argument("--lines", action="store_true", help="keep line numbers (self time per line)")
    p.add_argument("--all", action="store_true",
                   help="keep samples whose leaf is a known wait (epoll, queue get, condition wait): py-spy "
                        "counts some of them as active; by default they are dropped and listed as idle")
    args = p.parse_args(argv)
    stacks = load(args.profile)
    if args.grep:
        stacks = [(s, c) for s, c in stacks if any(args.grep in f for f in s)]
    idle = 0
    if not args.all:
        kept = []
        for frames, count in stacks:
            if any(re.search(pattern, frames[-1]) for pattern in IDLE_LEAVES):
                idle += count
            else:
                kept.append((frames, count))
        stacks = kept
    total = sum(c for _, c in stacks)
    if not total:
        print("no samples")
        return 1
    self_t = collections.Counter()
    incl = collections.Counter()
    threads = collections.Counter()
    for frames, count in stacks:
        frames_short = [short(f, args.lines) for f in frames]
        if frames_short and frames_short[0].startswith("thread"):
            threads[frames_short[0]] += count
        self_t[frames_short[-1]] += count
        for f in set(frames_short):
            incl[f] += count
    print(f"{args.profile}: {total} samples" + (f" (+{idle} idle-wait samples dropped)" if idle else ""))
    if len(threads) > 1:
        print("by thread:")
        for name, c in threads.most_common(8):
            print(f"  {c / total * 100:5.1f}%  {name}")
    print(f"self (top of stack), top {args.top}:")
    for name, c in self_t.most_common(args.top):
        print(f"  {c / total * 100:5.1f}%  {name}")
    print(f"inclusive, top {args.top}:")
    for name, c in incl.most_common(args.top):
        print(f"  {c / total * 100:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
