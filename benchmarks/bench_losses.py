"""Fused smoothed-loss kernels vs what users write today, side by side in one process (CPU).

    python benchmarks/bench_losses.py [--quick] [--threads 2] [--rounds 5] [--only rows|linear]

Every method of a table runs once per round, the rounds interleaved (so a load change on a shared
machine hits all of them alike); the tables give medians over rounds, ratios as the median of the
per-round ratios, the CPU time ratio (process CPU seconds, which time-slicing by other processes
does not inflate) and the load average before and after.

smoothed_nll (N = 4096, V = 32000 / 50257, fp32 / bf16, 8 alphas + rank) against:
  * naive PyTorch: log_softmax -> gather -> per-alpha -log2((1-a) p + a/V) -> rank by comparison,
  * the official bound code's approach: softmax + a full descending sort per token for the rank,
  * F.cross_entropy(reduction="none") alone (one number per token, no smoothing, no rank),
  * logits.sum(): the memory-read floor.
linear_smoothed_nll (N = 8192, D = 1024, V = 32000, fp32, all 8 smoothing levels + rank) against
the plain GEMM `hidden @ weight.T` alone, materialised GEMM + naive, and cut-cross-entropy's
torch_compile path (log-sum-exp and target logit only); time and extra peak RSS.
Writes benchmarks/results/losses.md / .json.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tokenbounds as tb  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import (  # noqa: E402
    enable_peers,
    machine_line,
    markdown_table,
    peak_rss_mib_of,
    write_result,
)

ALPHAS = tb.DEFAULT_ALPHAS


def naive_multi_alpha(logits, targets, vocab):
    """What a user writes: full log-softmax, gather, one smoothing expression per alpha, rank."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None])[:, 0]
    p = logp.exp()
    nll = torch.stack([-torch.log2((1 - a) * p + a / vocab) for a in ALPHAS], dim=-1)
    target_logit = logits.gather(-1, targets[:, None])
    rank = (logits > target_logit).sum(-1)
    return nll, logp, rank


def official_style(logits, targets, vocab):
    """The official bound code's approach: softmax, then a full descending sort for the rank."""
    probs = torch.softmax(logits.float(), dim=-1)
    p = probs.gather(-1, targets[:, None])[:, 0]
    order = torch.argsort(probs, dim=-1, descending=True)
    rank = (order == targets[:, None]).float().argmax(-1)
    nll = torch.stack([-torch.log2((1 - a) * p + a / vocab) for a in ALPHAS], dim=-1)
    return nll, rank


def interleaved(fns: dict, rounds: int, warmup: int = 1) -> dict[str, dict]:
    """Run every fn once per round, rounds interleaved; per fn the wall and CPU seconds per round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out = {name: {"wall": [], "cpu": []} for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            gc.collect()
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            out[name]["cpu"].append(time.process_time() - c0)
            out[name]["wall"].append(time.perf_counter() - w0)
    return out


def median_ratio(times: dict, name: str, base: str, key: str = "wall") -> float:
    """Median over rounds of times[name] / times[base] (same round; ratio of medians for a method
    timed in fewer rounds)."""
    a, b = times[name][key], times[base][key]
    if len(a) != len(b):
        return statistics.median(a) / statistics.median(b)
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def bench_rows(n, vocab, dtype, rounds):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, vocab, generator=g) * 3).to(dtype)
    t = torch.randint(0, vocab, (n,), generator=g)
    fns = {
        "tokenbounds.smoothed_nll": lambda: tb.smoothed_nll(x, t, ALPHAS),
        "naive torch (8 alphas + rank)": lambda: naive_multi_alpha(x, t, vocab),
        "F.cross_entropy alone": lambda: F.cross_entropy(x, t, reduction="none"),
        "logits.sum() (read floor)": lambda: x.sum(),
    }
    times = interleaved(fns, rounds)
    # The official-style sort is ~100x slower: timed once, outside the rounds.
    times.update(interleaved({"official-style (softmax + sort)": lambda: official_style(x, t, vocab)}, 1, warmup=0))
    return times


def bench_linear(n, d, vocab, rounds, with_cce):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g) / math.sqrt(d)
    w = torch.randn(vocab, d, generator=g)
    t = torch.randint(0, vocab, (n,), generator=g)
    fns = {
        "tokenbounds.linear_smoothed_nll": lambda: tb.linear_smoothed_nll(h, w, t, ALPHAS),
        "GEMM alone (hidden @ weight.T)": lambda: h @ w.t(),
        "materialised GEMM + naive": lambda: naive_multi_alpha(h @ w.t(), t, vocab),
    }
    if with_cce:
        try:
            from cut_cross_entropy import linear_cross_entropy

            fn = lambda: linear_cross_entropy(h, w, t, impl="torch_compile", reduction="none")  # noqa: E731
            fn()  # compiles
            fns["cut-cross-entropy torch_compile (lse + target only)"] = fn
        except Exception as err:  # noqa: BLE001 - a peer failing must not stop our benchmark
            print(f"note: cut-cross-entropy skipped ({type(err).__name__}: {err})")
    times = interleaved(fns, rounds)
    setup = (
        "import math, torch, tokenbounds as tb\n"
        f"g = torch.Generator().manual_seed(0); h = torch.randn({n}, {d}, generator=g) / math.sqrt({d})\n"
        f"w = torch.randn({vocab}, {d}, generator=g); t = torch.randint(0, {vocab}, ({n},), generator=g)\n"
        "import sys; sys.path.insert(0, 'benchmarks'); from bench_losses import naive_multi_alpha\n"
    )
    memory = {
        "tokenbounds.linear_smoothed_nll": peak_rss_mib_of("tb.linear_smoothed_nll(h, w, t)", setup),
        "materialised GEMM + naive": peak_rss_mib_of(f"naive_multi_alpha(h @ w.t(), t, {vocab})", setup),
    }
    return times, memory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer rounds (smoke run)")
    ap.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads (default 2)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per table (default 5; 2 with --quick)")
    ap.add_argument("--only", choices=("rows", "linear"), default=None, help="run one of the two tables")
    ap.add_argument("--no-peers", action="store_true", help="skip cut-cross-entropy")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with_cce = not args.no_peers and enable_peers()
    rounds = args.rounds or (2 if args.quick else 5)
    n = 512 if args.quick else 4096
    lines = [f"Machine: {machine_line()}; {rounds} interleaved rounds, medians", ""]
    data = {"machine": machine_line(), "rounds": rounds, "rows": [], "linear": {}}
    if args.only != "linear":
        rows = []
        load_before = load()
        for vocab in (32000, 50257):
            for dtype in (torch.float32, torch.bfloat16):
                times = bench_rows(n, vocab, dtype, rounds)
                ours = "tokenbounds.smoothed_nll"
                for name, tm in times.items():
                    rows.append([f"{n}x{vocab}", str(dtype).replace("torch.", ""), name,
                                 statistics.median(tm["wall"]) * 1e3, median_ratio(times, name, ours),
                                 median_ratio(times, name, ours, "cpu")])
                data["rows"].append({"n": n, "vocab": vocab, "dtype": str(dtype), "times": times})
                print(f"V={vocab} {dtype}: " + ", ".join(
                    f"{k} {statistics.median(v['wall']) * 1e3:.1f} ms" for k, v in times.items()), flush=True)
        lines += ["### smoothed_nll (8 smoothing levels + rank), CPU", "",
                  f"Load average (1/5/15 min) before {load_before}, after {load()}.", ""]
        lines.append(markdown_table(["N x V", "dtype", "method", "ms", "time / ours", "CPU time / ours"], rows))
    if args.only != "rows":
        ln, ld, lv = (1024, 256, 8000) if args.quick else (8192, 1024, 32000)
        load_before = load()
        times, memory = bench_linear(ln, ld, lv, rounds, with_cce)
        gemm = "GEMM alone (hidden @ weight.T)"
        ours = "tokenbounds.linear_smoothed_nll"
        logits_mib = ln * lv * 4 / 2**20
        lrows = [[name, statistics.median(tm["wall"]), median_ratio(times, name, gemm),
                  median_ratio(times, name, gemm, "cpu"), median_ratio(times, name, ours)]
                 for name, tm in times.items()]
        lines += ["", f"### linear_smoothed_nll, N={ln}, D={ld}, V={lv}, fp32 (materialised logits: {logits_mib:.0f} MiB)", "",
                  f"Load average (1/5/15 min) before {load_before}, after {load()}.", ""]
        lines.append(markdown_table(["method", "s", "time / GEMM", "CPU time / GEMM", "time / ours"], lrows))
        lines += ["", markdown_table(
            ["method", "extra peak RSS (MiB)", "% of materialised logits"],
            [[k, v, 100 * v / logits_mib] for k, v in memory.items()],
        )]
        data["linear"] = {"n": ln, "d": ld, "vocab": lv, "times": times, "peak_rss_mib": memory}
    md = "\n".join(lines)
    print(md)
    if args.only is None:
        write_result("losses" + ("_quick" if args.quick else ""), md, data)
    else:
        print("(--only: benchmarks/results not written)")


if __name__ == "__main__":
    main()
