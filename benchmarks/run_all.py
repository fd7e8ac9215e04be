"""Run every benchmark script in benchmarks/ (results land in benchmarks/results/).

    python benchmarks/run_all.py [--quick] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="pass --quick to every script that takes it")
    ap.add_argument("--only", nargs="*", help="script stems to run, e.g. bench_losses bounds_table")
    args = ap.parse_args()
    scripts = sorted(glob.glob(os.path.join(HERE, "bench_*.py"))) + [os.path.join(HERE, "bounds_table.py")]
    failures = []
    for path in scripts:
        stem = os.path.splitext(os.path.basename(path))[0]
        if not os.path.exists(path) or (args.only and stem not in args.only):
            continue
        cmd = [sys.executable, path]
        if args.quick:
            with open(path) as f:
                if "--quick" in f.read():
                    cmd.append("--quick")
        print(f"== {' '.join(cmd)}", flush=True)
        t0 = time.time()
        # Tee the output to benchmarks/results/<stem>.txt, which the README quotes for scripts
        # that print their tables instead of writing markdown.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        rc = proc.wait()
        if not rc and not args.quick:
            with open(os.path.join(HERE, "results", f"{stem}.txt"), "w") as f:
                f.write(f"$ python benchmarks/{stem}.py\n" + "".join(lines))
        print(f"== {stem}: exit {rc} in {time.time() - t0:.0f} s", flush=True)
        if rc:
            failures.append(stem)
    if failures:
        print(f"failed: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
