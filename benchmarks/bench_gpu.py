"""GPU benchmarks of every CUDA kernel against torch on the same GPU, side by side in one process.

    python benchmarks/bench_gpu.py [--out DIR] [--rounds 7] [--quick] [--device cuda]

Run by scripts/gpu_checks.sh on a machine with a GPU (never run yet: no GPU was lent while it was
written). Every method of a table runs once per round, rounds interleaved; times are medians of
CUDA-event timings, ratios medians of per-round ratios. Tables:

* smoothed_nll (8 smoothing levels + rank): achieved read bandwidth (logits bytes / time) against
  the GPU's nominal HBM peak and against a measured device-to-device copy, vs F.cross_entropy
  (issue 12 target: >= 70% of the HBM peak for bf16 at V = 128k);
* linear_smoothed_nll vs the plain GEMM, GEMM + F.cross_entropy, and Liger-Kernel / cut-cross-
  entropy where they import; extra peak memory against the logits (targets: <= 1.2x the GEMM,
  <= 10% of the logits memory);
* hadamard_transform vs a dense x @ H GEMM; gram_accumulate_ vs torch's x.T @ x.

``--device cpu`` runs the same harness at toy sizes on the CPU backends (a smoke test of the
script itself, not a benchmark). Writes DIR/bench_gpu.md and DIR/bench_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tokenbounds as tb  # noqa: E402
from _common import enable_peers, markdown_table  # noqa: E402
from tokenbounds.ops.gram import gram_accumulate_  # noqa: E402
from tokenbounds.ops.hadamard import hadamard_transform  # noqa: E402

ALPHAS = tb.DEFAULT_ALPHAS
# Nominal HBM bandwidth (GB/s) by device-name substring (vendor data sheets).
HBM_PEAK_GBS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0,
                "A100-SXM4-80GB": 2039.0, "A100-SXM4-40GB": 1555.0, "A100": 1555.0, "L40S": 864.0}


class Timer:
    """Wall time of fn() in seconds: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3


def interleaved(fns: dict, rounds: int, timer: Timer) -> dict[str, list[float]]:
    for fn in fns.values():  # warm-up: compilation, autotuning, allocator
        fn()
    out = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            out[name].append(timer(fn))
    return out


def ratio(times, name, base) -> float:
    return statistics.median(a / b for a, b in zip(times[name], times[base], strict=True))


def peak_memory(fn, device: torch.device) -> float:
    """Extra peak allocated bytes of fn() (CUDA only; NaN on the CPU)."""
    if device.type != "cuda":
        return math.nan
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)


def hbm_peak(device: torch.device) -> float:
    if device.type != "cuda":
        return math.nan
    name = torch.cuda.get_device_name(device)
    for key, gbs in HBM_PEAK_GBS.items():
        if key in name:
            return gbs
    return math.nan


def bench_rows(device, rounds, timer, quick):
    n = 256 if quick else 4096
    vocabs = (2048,) if quick else (32000, 128256)
    rows, data = [], []
    x_copy = torch.empty(n * (vocabs[-1] if not quick else 2048) // 2, device=device)
    copy_t = statistics.median(interleaved({"copy": lambda: x_copy.clone()}, rounds, timer)["copy"])
    copy_gbs = 2 * x_copy.numel() * 4 / copy_t / 1e9  # read + write
    peak = hbm_peak(device)
    for vocab in vocabs:
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator(device=device).manual_seed(0)
            x = (torch.randn(n, vocab, generator=g, device=device) * 3).to(dtype)
            t = torch.randint(0, vocab, (n,), generator=g, device=device)
            fns = {
                "tokenbounds.smoothed_nll": lambda x=x, t=t: tb.smoothed_nll(x, t, ALPHAS),
                "F.cross_entropy": lambda x=x, t=t: F.cross_entropy(x, t, reduction="none"),
                "logits.sum() (read floor)": lambda x=x: x.sum(),
            }
            times = interleaved(fns, rounds, timer)
            nbytes = x.numel() * x.element_size()
            for name, tm in times.items():
                sec = statistics.median(tm)
                gbs = nbytes / sec / 1e9
                rows.append([f"{n}x{vocab}", str(dtype).replace("torch.", ""), name, sec * 1e3, gbs,
                             100 * gbs / peak, 100 * gbs / copy_gbs, ratio(times, name, "tokenbounds.smoothed_nll")])
            data.append({"n": n, "vocab": vocab, "dtype": str(dtype), "seconds": times})
    table = markdown_table(["N x V", "dtype", "method", "ms", "GB/s read", "% HBM peak", "% copy BW", "time / ours"], rows)
    note = f"HBM peak {peak:.0f} GB/s (nominal), measured copy {copy_gbs:.0f} GB/s (read + write)"
    return table, note, data


def linear_methods(h, w, t, device) -> dict:
    """The fused-head methods on one (hidden, weight, targets)."""
    fns = {
        "tokenbounds.linear_smoothed_nll": lambda: tb.linear_smoothed_nll(h, w, t, ALPHAS),
        "GEMM alone": lambda: h @ w.T,
        "GEMM + F.cross_entropy": lambda: F.cross_entropy((h @ w.T).float(), t, reduction="none"),
    }
    if not (enable_peers() and device.type == "cuda"):
        return fns
    try:
        from cut_cross_entropy import linear_cross_entropy

        fns["cut-cross-entropy (cce)"] = lambda: linear_cross_entropy(h, w, t, impl="cce", reduction="none")
    except Exception as err:  # noqa: BLE001 - a peer failing must not stop the benchmark
        print(f"note: cut-cross-entropy skipped ({type(err).__name__}: {err})")
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyLoss,
        )

        liger = LigerFusedLinearCrossEntropyLoss(reduction="none")
        fns["Liger fused linear CE"] = lambda: liger(w, h, t)
    except Exception as err:  # noqa: BLE001
        print(f"note: Liger-Kernel skipped ({type(err).__name__}: {err})")
    return fns


def bench_linear(device, rounds, timer, quick):
    n, d, vocab = (256, 64, 2000) if quick else (8192, 2048, 128256)
    rows, data = [], {}
    for dtype in (torch.bfloat16, torch.float32):
        g = torch.Generator(device=device).manual_seed(0)
        h = (torch.randn(n, d, generator=g, device=device) / math.sqrt(d)).to(dtype)
        w = torch.randn(vocab, d, generator=g, device=device).to(dtype)
        t = torch.randint(0, vocab, (n,), generator=g, device=device)
        fns = linear_methods(h, w, t, device)
        times = interleaved(fns, rounds, timer)
        logits_bytes = n * vocab * 4
        for name, tm in times.items():
            mem = peak_memory(fns[name], device)
            rows.append([str(dtype).replace("torch.", ""), name, statistics.median(tm) * 1e3,
                         ratio(times, name, "GEMM alone"), 100 * mem / logits_bytes])
        data[str(dtype)] = {"n": n, "d": d, "vocab": vocab, "seconds": times}
    table = markdown_table(["dtype", "method", "ms", "time / GEMM", "extra peak memory, % of fp32 logits"], rows)
    return table, f"N={n}, D={d}, V={vocab}", data


def bench_hadamard(device, rounds, timer, quick):
    rows_n = 512 if quick else 16384
    rows, data = [], {}
    for n in ((256,) if quick else (4096, 8192, 12 * 1024)):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows_n, n, device=device).to(dtype)
            hm = hadamard_transform(torch.eye(n, device=device, dtype=torch.float32)).to(dtype)
            fns = {"tokenbounds.hadamard_transform": lambda x=x: hadamard_transform(x),
                   "dense x @ H (torch GEMM)": lambda x=x, hm=hm: x @ hm}
            times = interleaved(fns, rounds, timer)
            for name, tm in times.items():
                rows.append([f"{rows_n}x{n}", str(dtype).replace("torch.", ""), name,
                             statistics.median(tm) * 1e3, ratio(times, name, "tokenbounds.hadamard_transform")])
            data[f"{n}-{dtype}"] = times
    return markdown_table(["rows x n", "dtype", "method", "ms", "time / ours"], rows), "", data


def bench_gram(device, rounds, timer, quick):
    n, d = (512, 128) if quick else (16384, 4096)
    rows, data = [], {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(n, d, device=device).to(dtype)
        acc = torch.zeros(d, d, device=device)
        fns = {"tokenbounds.gram_accumulate_": lambda x=x, acc=acc: gram_accumulate_(acc, x),
               "torch acc += x.T @ x (full)": lambda x=x, acc=acc: acc.add_((x.T @ x).float())}
        times = interleaved(fns, rounds, timer)
        for name, tm in times.items():
            rows.append([f"{n}x{d}", str(dtype).replace("torch.", ""), name, statistics.median(tm) * 1e3,
                         ratio(times, name, "tokenbounds.gram_accumulate_")])
        data[str(dtype)] = times
    return markdown_table(["n x d", "dtype", "method", "ms", "time / ours"], rows), "", data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join("benchmarks", "results"), help="output directory")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    ap.add_argument("--quick", action="store_true", help="toy sizes (smoke run)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (harness smoke test)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine (or --device cpu --quick to smoke-test the script)",
              file=sys.stderr)
        return 2
    quick = args.quick or device.type != "cuda"
    timer = Timer(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (harness smoke test)"
    lines = [f"Device: {name}; torch {torch.__version__}; {args.rounds} interleaved rounds, medians", ""]
    data = {"device": name, "torch": torch.__version__}
    for title, fn in (("smoothed_nll (8 smoothing levels + rank)", bench_rows),
                      ("linear_smoothed_nll", bench_linear),
                      ("hadamard_transform", bench_hadamard),
                      ("gram_accumulate_", bench_gram)):
        table, note, result = fn(device, args.rounds, timer, quick)
        lines += [f"### {title}" + (f", {note}" if note else ""), "", table, ""]
        data[title] = result
        print("\n".join(lines[-4:]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_gpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "bench_gpu.json"), "w") as f:
        json.dump(data, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
