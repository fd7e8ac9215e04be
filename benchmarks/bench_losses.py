"""Fused smoothed-loss kernels vs what users write today, side by side in one process (CPU).

    python benchmarks/bench_losses.py [--quick] [--threads 2]

smoothed_nll (N = 4096, V = 32000 / 50257, fp32 / bf16, 8 alphas + rank) against:
  * naive PyTorch: log_softmax -> gather -> per-alpha -log2((1-a) p + a/V) -> rank by comparison,
  * the official bound code's approach: softmax + a full descending sort per token for the rank,
  * F.cross_entropy(reduction="none") alone (one number per token, no smoothing, no rank),
  * logits.sum(): the memory-read floor.
linear_smoothed_nll (N = 8192, D = 1024, V = 32000) against materialised `hidden @ weight.T` +
naive, the plain GEMM alone, and cut-cross-entropy's torch_compile path; time and extra peak RSS.
Writes benchmarks/results/losses.md / .json.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tokenbounds as tb  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import (  # noqa: E402
    best_time,
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


def bench_rows(n, vocab, dtype, repeats):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, vocab, generator=g) * 3).to(dtype)
    t = torch.randint(0, vocab, (n,), generator=g)
    times = {
        "tokenbounds.smoothed_nll": best_time(lambda: tb.smoothed_nll(x, t, ALPHAS), repeats),
        "naive torch (8 alphas + rank)": best_time(lambda: naive_multi_alpha(x, t, vocab), repeats),
        "official-style (softmax + sort)": best_time(lambda: official_style(x, t, vocab), max(1, repeats // 3)),
        "F.cross_entropy alone": best_time(lambda: F.cross_entropy(x, t, reduction="none"), repeats),
        "logits.sum() (read floor)": best_time(lambda: x.sum(), repeats),
    }
    return times


def bench_linear(n, d, vocab, repeats, with_cce):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g) / math.sqrt(d)
    w = torch.randn(vocab, d, generator=g)
    t = torch.randint(0, vocab, (n,), generator=g)
    times = {
        "tokenbounds.linear_smoothed_nll": best_time(lambda: tb.linear_smoothed_nll(h, w, t, ALPHAS), repeats),
        "GEMM alone (hidden @ weight.T)": best_time(lambda: h @ w.t(), repeats),
        "materialised GEMM + naive": best_time(lambda: naive_multi_alpha(h @ w.t(), t, vocab), repeats),
    }
    if with_cce:
        try:
            from cut_cross_entropy import linear_cross_entropy

            fn = lambda: linear_cross_entropy(h, w, t, impl="torch_compile", reduction="none")  # noqa: E731
            times["cut-cross-entropy torch_compile"] = best_time(fn, max(1, repeats // 2), warmup=1)
        except Exception as err:  # noqa: BLE001 - a peer failing must not stop our benchmark
            print(f"note: cut-cross-entropy skipped ({type(err).__name__}: {err})")
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
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (smoke run)")
    ap.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads (default 2)")
    ap.add_argument("--no-peers", action="store_true", help="skip cut-cross-entropy")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with_cce = not args.no_peers and enable_peers()
    repeats = 2 if args.quick else 5
    n = 512 if args.quick else 4096
    lines = [f"Machine: {machine_line()}", ""]
    data = {"machine": machine_line(), "rows": [], "linear": {}}
    rows = []
    for vocab in (32000, 50257):
        for dtype in (torch.float32, torch.bfloat16):
            times = bench_rows(n, vocab, dtype, repeats)
            ours = times["tokenbounds.smoothed_nll"]
            for name, sec in times.items():
                rows.append([f"{n}x{vocab}", str(dtype).replace("torch.", ""), name, sec * 1e3, sec / ours])
            data["rows"].append({"n": n, "vocab": vocab, "dtype": str(dtype), "seconds": times})
            print(f"V={vocab} {dtype}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items()), flush=True)
    lines.append("### smoothed_nll (8 smoothing levels + rank), CPU")
    lines.append("")
    lines.append(markdown_table(["N x V", "dtype", "method", "ms", "time / ours"], rows))
    ln, ld, lv = (1024, 256, 8000) if args.quick else (8192, 1024, 32000)
    times, memory = bench_linear(ln, ld, lv, max(1, repeats // 2), with_cce)
    ours = times["tokenbounds.linear_smoothed_nll"]
    gemm = times["GEMM alone (hidden @ weight.T)"]
    logits_mib = ln * lv * 4 / 2**20
    lrows = [[name, sec, sec / ours, sec / gemm] for name, sec in times.items()]
    lines += ["", f"### linear_smoothed_nll, N={ln}, D={ld}, V={lv}, fp32 (materialised logits: {logits_mib:.0f} MiB)", ""]
    lines.append(markdown_table(["method", "s", "time / ours", "time / GEMM"], lrows))
    lines += ["", markdown_table(
        ["method", "extra peak RSS (MiB)", "% of materialised logits"],
        [[k, v, 100 * v / logits_mib] for k, v in memory.items()],
    )]
    data["linear"] = {"n": ln, "d": ld, "vocab": lv, "seconds": times, "peak_rss_mib": memory}
    md = "\n".join(lines)
    print(md)
    write_result("losses" + ("_quick" if args.quick else ""), md, data)


if __name__ == "__main__":
    main()
