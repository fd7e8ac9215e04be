"""Hessian trace: tokenbounds vs curvlinops 3.0.1 and PyHessian on a ~300k-parameter GPT.

Same estimator (Hutchinson / Hutch++, Rademacher), same number of matvecs, same model and batch.
Time per matvec is measured side by side in this process (interleaved repeats, best of);
peak memory is measured in a fresh subprocess per library (peak RSS above the RSS after building
the model and batch and one warm-up estimate, by benchmarks/_common.py::peak_rss_mib_of).
Also times the gram kernels.

    python benchmarks/bench_hessian.py [--matvecs 12] [--repeats 3] [--threads 1] [--json out.json]

--threads 1 gives stable timings on a loaded 2-core machine: there, with 2 threads every op waits
at an OpenMP barrier for a descheduled thread and the ratios are noise (BENCH_OURS picks our
variants, e.g. BENCH_OURS=tokenbounds-autograd:4,tokenbounds-func:12).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn

PEERS = os.environ.get("BENCH_PEERS") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv-peers", "lib", "python3.11", "site-packages")

from _common import peak_rss_mib_of  # noqa: E402
from tokenbounds.hessian import ModelHessian, hutchinson_trace, hutchpp_trace  # noqa: E402
from tokenbounds.hessian.operators import _sdpa_math  # noqa: E402
from tokenbounds.models.gpt import GPT, GPTConfig  # noqa: E402

CFG = GPTConfig(vocab_size=512, context_length=64, n_layer=2, n_head=4, d_model=96)
BATCH, SEQ = 4, 64
# "tokenbounds-<method>[:<probe_block>]"; without ":k" the library's default probe_block.
OURS = tuple(os.environ.get("BENCH_OURS", "tokenbounds-autograd,tokenbounds-func").split(","))


def setup():
    torch.manual_seed(0)
    model = GPT(CFG)
    tokens = torch.randint(0, CFG.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    return model, tokens[:, :-1], tokens[:, 1:]


class Flat(nn.Module):
    """GPT -> [N, V] logits, the (model, criterion) shape the peers expect."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        with _sdpa_math():
            logits = self.model(x)
        return logits.reshape(-1, logits.shape[-1])


def add_peers() -> None:
    if os.path.isdir(PEERS) and PEERS not in sys.path:
        sys.path.append(PEERS)  # at the END: our torch wins


def runner(lib: str, estimator: str, matvecs: int, model, x, y):
    """A zero-argument callable doing one full estimate, plus its setup (not timed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if lib.startswith("tokenbounds"):
        name, _, block = lib.partition(":")
        kwargs = {"method": name.split("-")[1] if "-" in name else "autograd"}
        if block:
            kwargs["probe_block"] = int(block)

        def run():
            op = ModelHessian(model, (x, y), **kwargs)
            est = hutchinson_trace if estimator == "hutchinson" else hutchpp_trace
            return est(op, matvecs).value
        return run
    if lib == "curvlinops":
        import curvlinops

        flat = Flat(model)
        y_flat = y.reshape(-1)

        def run():
            H = curvlinops.HessianLinearOperator(flat, nn.CrossEntropyLoss(), params, [(x, y_flat)],
                                                 check_deterministic=False)
            est = curvlinops.hutchinson_trace if estimator == "hutchinson" else curvlinops.hutchpp_trace
            return float(est(H, matvecs))
        return run
    if lib == "pyhessian":
        if estimator != "hutchinson":
            return None
        from pyhessian import hessian

        flat = Flat(model)

        def run():
            h = hessian(flat, nn.CrossEntropyLoss(), data=(x, y.reshape(-1)), cuda=False)
            # PyHessian stops when |mean_k - mean_{k-1}| / (mean_{k-1} + 1e-6) < tol, without abs() in
            # the denominator: for a negative trace (this model at initialization) any tol > -inf
            # can stop it after 2 probes. tol=-inf forces exactly maxIter probes.
            samples = h.trace(maxIter=matvecs, tol=-math.inf)
            if len(samples) != matvecs:
                raise RuntimeError(f"PyHessian used {len(samples)} probes, not {matvecs}")
            return float(sum(samples) / len(samples))
        return run
    raise ValueError(lib)


def available(lib: str) -> bool:
    if lib.startswith("tokenbounds"):
        return True
    add_peers()
    try:
        __import__({"curvlinops": "curvlinops", "pyhessian": "pyhessian"}[lib])
        return True
    except Exception as err:  # noqa: BLE001
        print(f"note: {lib} unavailable ({type(err).__name__}: {err}); skipped")
        return False


def peak_memory_mib(lib: str, estimator: str, matvecs: int, threads: int) -> float | None:
    """Extra peak RSS (MiB) of one full estimate, in a fresh process (benchmarks/_common.py's
    sampler thread on /proc/self/statm); model, batch, imports and a warm-up estimate are setup."""
    here = os.path.dirname(os.path.abspath(__file__))
    setup_code = (
        f"import sys; sys.path.insert(0, {here!r}); import torch; torch.set_num_threads({threads})\n"
        "import bench_hessian as B; B.add_peers()\n"
        f"model, x, y = B.setup(); run = B.runner({lib!r}, {estimator!r}, {matvecs}, model, x, y); run()"
    )
    # A fixed mmap threshold turns off glibc's adaptive one, under which the warm-up's freed
    # blocks stay in the heap and hide the measured run's peak (curvlinops Hutch++ read 2 MiB).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    try:
        return peak_rss_mib_of("run()", setup_code)
    except RuntimeError as err:
        print(f"note: memory run for {lib} failed: {str(err)[-300:]}")
        return None


def gram_table(rows: list) -> None:
    from tokenbounds.ops._dispatch import has_op
    from tokenbounds.ops.gram import gram, rademacher_matmul

    if not has_op("gram_accumulate_", "cpu"):
        print("note: tokenbounds._C not built; gram kernel table skipped")
        return

    x = torch.randn(8192, 1024)
    xb = x.to(torch.bfloat16)

    def best(fn, reps=3):
        fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return min(ts)

    t_ours = best(lambda: gram(x))
    t_torch = best(lambda: x.T @ x)
    rows.append({"kernel": "gram fp32 8192x1024 (one triangle)", "ours_s": t_ours, "peer": "torch x.T@x",
                 "peer_s": t_torch, "ratio": t_ours / t_torch})
    t_ours = best(lambda: gram(xb, acc_dtype=torch.float32))
    t_torch = best(lambda: xb.float().T @ xb.float())
    rows.append({"kernel": "gram bf16->fp32 8192x1024", "ours_s": t_ours, "peer": "torch upcast+x.T@x",
                 "peer_s": t_torch, "ratio": t_ours / t_torch})
    k = 32
    t_ours = best(lambda: rademacher_matmul(x, k, seed=1))
    t_torch = best(lambda: x @ (torch.randint(0, 2, (1024, k)).float() * 2 - 1))
    rows.append({"kernel": f"x @ Z, Z Rademacher 1024x{k} (in-kernel)", "ours_s": t_ours,
                 "peer": "torch randint + matmul", "peer_s": t_torch, "ratio": t_ours / t_torch})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--matvecs", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, x, y = setup()
    n = sum(p.numel() for p in model.parameters())
    print(f"model: GPT {n} parameters, batch {BATCH} x {SEQ} tokens, {args.matvecs} matvecs, "
          f"{torch.get_num_threads()} threads")
    libs = [lib for lib in (*OURS, "curvlinops", "pyhessian") if available(lib)]
    results = []
    for estimator in ("hutchinson", "hutchpp"):
        runs = {lib: runner(lib, estimator, args.matvecs, model, x, y) for lib in libs}
        runs = {k: v for k, v in runs.items() if v is not None}
        times = {k: [] for k in runs}
        values = {}
        for _ in range(args.repeats):  # interleaved: every library sees the same machine load
            for lib, run in runs.items():
                t = time.perf_counter()
                values[lib] = run()
                times[lib].append(time.perf_counter() - t)
        for lib in runs:
            row = {"estimator": estimator, "library": lib, "ms_per_matvec": 1e3 * min(times[lib]) / args.matvecs,
                   "value": values[lib]}
            if not args.no_memory:
                row["peak_mb"] = peak_memory_mib(lib, estimator, args.matvecs, torch.get_num_threads())
            results.append(row)

    ref = {r["estimator"]: r for r in results if r["library"] == OURS[0]}
    print(f"ours = {OURS[0]}")
    print(f"\n{'estimator':10s} {'library':20s} {'ms/matvec':>10s} {'ours/peer time':>15s} {'peak MB':>9s} "
          f"{'ours/peer mem':>14s} {'estimate':>10s}")
    for r in results:
        o = ref[r["estimator"]]
        tr = o["ms_per_matvec"] / r["ms_per_matvec"]
        mem = r.get("peak_mb")
        mr = (o["peak_mb"] / mem) if mem and o.get("peak_mb") else float("nan")
        r["ours_over_peer_time"], r["ours_over_peer_memory"] = tr, mr
        print(f"{r['estimator']:10s} {r['library']:20s} {r['ms_per_matvec']:10.1f} {tr:15.3f} "
              f"{(mem if mem is not None else float('nan')):9.0f} {mr:14.3f} {r['value']:10.4g}")

    kernels: list = []
    gram_table(kernels)
    print(f"\n{'kernel':45s} {'ours s':>9s} {'peer':>24s} {'peer s':>9s} {'ours/peer':>10s}")
    for r in kernels:
        print(f"{r['kernel']:45s} {r['ours_s']:9.4f} {r['peer']:>24s} {r['peer_s']:9.4f} {r['ratio']:10.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"hessian": results, "kernels": kernels, "num_parameters": n}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
