"""Peak memory of a command and all its descendants (multi-process runners spawn workers).

``run_measured(cmd)`` samples the resident set size of the whole process tree from /proc every
``interval`` seconds and returns (exit code, wall seconds, peak RSS bytes of the tree). Summing the
tree matters: with ``--direct_running_mode multi_processing`` the work happens in child processes.
"""
import os
import subprocess
import threading
import time


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f'/proc/{pid}/task'):
            with open(f'/proc/{pid}/task/{task}/children') as handle:
                found += [int(c) for c in handle.read().split()]
    except OSError:
        pass
    return found


def _rss(pid: int) -> int:
    try:
        with open(f'/proc/{pid}/statm') as handle:
            return int(handle.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except OSError:
        return 0


def tree_rss(pid: int) -> int:
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        total += _rss(current)
        stack += _children(current)
    return total


def run_measured(cmd: list[str], *, interval: float = 0.05, env: dict | None = None,
                 stdout=None) -> tuple[int, float, int]:
    start = time.perf_counter()
    process = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=subprocess.STDOUT if stdout else None)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(process.pid))
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = process.wait()
    done.set()
    sampler.join()
    return code, time.perf_counter() - start, peak


def run_logged(cmd: list[str], log: str) -> tuple[float, float, str]:
    """Runs ``cmd`` measured (``run_measured``) with its output in ``log``; returns (wall seconds,
    peak MiB of its process tree, its output). Exits with the log's tail if it fails."""
    with open(log, 'w') as handle:
        code, seconds, peak = run_measured(cmd, stdout=handle)
    with open(log) as handle:
        text = handle.read()
    if code != 0:
        raise SystemExit(f'{" ".join(cmd[:3])} failed with exit code {code}; see {log}:\n{text[-3000:]}')
    return seconds, peak / 2**20, text
