"""Helpers shared by the benchmark scripts: timing, peer imports, subprocess peak memory, tables."""

from __future__ import annotations

import gc
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_SITE = os.path.join(ROOT, ".venv-peers", "lib", f"python{sys.version_info.major}.{sys.version_info.minor}", "site-packages")


def enable_peers() -> bool:
    """Make the benchmark-only peer libraries importable (appended last: our torch wins)."""
    if os.path.isdir(PEERS_SITE) and PEERS_SITE not in sys.path:
        sys.path.append(PEERS_SITE)
    return os.path.isdir(PEERS_SITE)


def best_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Minimum wall time of fn() over repeats (seconds), after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_rss_mib_of(code: str, setup: str = "") -> float:
    """Extra peak resident memory (MiB) of running ``code`` after ``setup`` in a fresh process.

    A thread samples the current RSS (/proc/self/statm) every 0.5 ms while ``code`` runs; the
    result is the peak minus the RSS just before (ru_maxrss cannot be used: it also holds the
    peak of the imports and the setup)."""
    prog = (
        "import os, threading, time\n"
        f"{setup}\n"
        "page = os.sysconf('SC_PAGE_SIZE')\n"
        "def rss():\n"
        "    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * page\n"
        "import gc; gc.collect(); base = rss(); peak = [base]; done = [False]\n"
        "def sample():\n"
        "    while not done[0]:\n"
        "        peak[0] = max(peak[0], rss()); time.sleep(0.0005)\n"
        "th = threading.Thread(target=sample); th.start()\n"
        f"{code}\n"
        "peak[0] = max(peak[0], rss()); done[0] = True; th.join()\n"
        "print((peak[0] - base) / 2**20)\n"
    )
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def self_peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, markdown: str, data) -> None:
    """Write benchmarks/results/<name>.md and .json (the README quotes the .md), each atomically."""
    from tokenbounds.eval.fileio import atomic_write_json, atomic_write_text

    out_dir = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, f"{name}.md"), markdown + "\n")
    atomic_write_json(os.path.join(out_dir, f"{name}.json"), data)


def machine_line() -> str:
    import platform

    import torch

    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"
