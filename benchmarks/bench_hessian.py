"""Hessian trace: tokenbounds vs curvlinops 3.0.1 and PyHessian 0.1 on a 279k-parameter GPT.

Same estimator (Hutchinson / Hutch++, Rademacher), same number of probes, same model and batch.
Each library runs its own user-facing entry point; time per probe is the median over interleaved
repeats in this process (wall clock and CPU time: with one thread the CPU time is what a quiet
machine's wall clock would read). Peak memory is measured in a fresh subprocess per library
(peak RSS above the RSS after building the model and batch and one warm-up estimate, by
benchmarks/_common.py::peak_rss_mib_of). Accuracy: every library also evaluates z^T H z on the
*same* Rademacher probes (ours), giving each an estimate +- standard error that must agree; the
own-probe estimates are compared in units of their combined standard error.

    python benchmarks/bench_hessian.py [--matvecs 12] [--repeats 5] [--threads N] [--json out.json]

tokenbounds' Hutchinson uses second-order forward mode (tokenbounds.hessian.taylor: z^T H z
without forming H z); Hutch++ needs H Q and uses Hessian-vector products. BENCH_OURS picks our
variants ("tokenbounds" = the defaults; "tokenbounds-hvp" / "tokenbounds-func" force the
autograd / torch.func HVP path, "...:<probe_block>" sets the block), e.g.
BENCH_OURS=tokenbounds,tokenbounds-hvp:8,tokenbounds-func:12. --threads 1 gives stable timings
on a loaded 2-core machine: there, with 2 threads every op waits at an OpenMP barrier for a
descheduled thread.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn
from _common import enable_peers, machine_line, peak_rss_mib_of  # noqa: E402
from tokenbounds.hessian import ModelHessian, hutchinson_trace, hutchpp_trace  # noqa: E402
from tokenbounds.hessian.operators import _sdpa_math  # noqa: E402
from tokenbounds.models.gpt import GPT, GPTConfig  # noqa: E402
from tokenbounds.ops.gram import rademacher_probes  # noqa: E402

CFG = GPTConfig(vocab_size=512, context_length=64, n_layer=2, n_head=4, d_model=96)
BATCH, SEQ = 4, 64
OURS = tuple(os.environ.get("BENCH_OURS", "tokenbounds").split(","))
PEERS = ("curvlinops", "pyhessian")
SAMPLE_SEED = 0  # our probes (also the shared probes every library evaluates)
PEER_SEED = 1  # torch.manual_seed before each peer estimate, so their own-probe values repeat


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
    enable_peers()


@contextlib.contextmanager
def _quiet_pyhessian():
    # PyHessian calls loss.backward(create_graph=True); torch warns about the parameter <-> .grad
    # reference cycle that creates (tokenbounds uses torch.autograd.grad and never sets .grad).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
        yield


def our_kwargs(lib: str) -> dict:
    """"tokenbounds[-hvp|-func][:block]" -> ModelHessian keyword arguments."""
    name, _, block = lib.partition(":")
    kwargs: dict = {}
    variant = name.split("-", 1)[1] if "-" in name else ""
    if variant == "hvp":
        kwargs.update(quadratic="hvp", method="autograd")
    elif variant == "func":
        kwargs.update(quadratic="hvp", method="func")
    elif variant:
        raise ValueError(f"unknown tokenbounds variant {lib!r}")
    if block:
        kwargs["probe_block"] = int(block)
    return kwargs


def runner(lib: str, estimator: str, matvecs: int, model, x, y):
    """A zero-argument callable doing one full estimate with the library's own entry point,
    returning (value, stderr or None); None if the library has no such estimator."""
    params = [p for p in model.parameters() if p.requires_grad]
    if lib.startswith("tokenbounds"):
        kwargs = our_kwargs(lib)
        est = hutchinson_trace if estimator == "hutchinson" else hutchpp_trace

        def run():
            e = est(ModelHessian(model, (x, y), **kwargs), matvecs, seed=SAMPLE_SEED)
            return e.value, e.stderr
        return run
    if lib == "curvlinops":
        import curvlinops

        flat = Flat(model)
        y_flat = y.reshape(-1)
        est = curvlinops.hutchinson_trace if estimator == "hutchinson" else curvlinops.hutchpp_trace

        def run():
            torch.manual_seed(PEER_SEED)  # its probes come from torch's global generator
            H = curvlinops.HessianLinearOperator(flat, nn.CrossEntropyLoss(), params, [(x, y_flat)],
                                                 check_deterministic=False)
            return float(est(H, matvecs)), None
        return run
    if lib == "pyhessian":
        if estimator != "hutchinson":
            return None
        from pyhessian import hessian

        flat = Flat(model)

        def run():
            torch.manual_seed(PEER_SEED)
            with _quiet_pyhessian():
                h = hessian(flat, nn.CrossEntropyLoss(), data=(x, y.reshape(-1)), cuda=False)
                # PyHessian stops when |mean_k - mean_{k-1}| / (mean_{k-1} + 1e-6) < tol, without abs()
                # in the denominator: for a negative trace (this model at initialization) any
                # tol > -inf can stop it after 2 probes. tol=-inf forces exactly maxIter probes.
                samples = h.trace(maxIter=matvecs, tol=-math.inf)
            if len(samples) != matvecs:
                raise RuntimeError(f"PyHessian used {len(samples)} probes, not {matvecs}")
            return _mean_stderr(samples)
        return run
    raise ValueError(lib)


def same_probe_samples(lib: str, model, x, y, Z: torch.Tensor) -> list[float]:
    """z_c^T H z_c for the shared probes Z [n, m], through each library's own Hessian products."""
    params = [p for p in model.parameters() if p.requires_grad]
    if lib.startswith("tokenbounds"):
        return ModelHessian(model, (x, y), **our_kwargs(lib)).quadratic_forms(Z).tolist()
    if lib == "curvlinops":
        import curvlinops

        H = curvlinops.HessianLinearOperator(Flat(model), nn.CrossEntropyLoss(), params, [(x, y.reshape(-1))],
                                             check_deterministic=False)
        return ((H @ Z) * Z).sum(0, dtype=torch.float64).tolist()
    if lib == "pyhessian":
        from pyhessian import hessian
        from pyhessian.utils import hessian_vector_product

        with _quiet_pyhessian():
            h = hessian(Flat(model), nn.CrossEntropyLoss(), data=(x, y.reshape(-1)), cuda=False)
        out = []
        for c in range(Z.shape[1]):
            v = [t.view_as(p) for t, p in zip(torch.split(Z[:, c], [p.numel() for p in h.params]), h.params,
                                               strict=True)]
            hv = hessian_vector_product(h.gradsH, h.params, v)
            out.append(float(sum((a * b).sum(dtype=torch.float64) for a, b in zip(hv, v, strict=True))))
        for p in model.parameters():
            p.grad = None  # PyHessian's backward(create_graph=True) left graph-holding .grad fields
        return out
    raise ValueError(lib)


def _mean_stderr(samples) -> tuple[float, float]:
    s = torch.tensor(samples, dtype=torch.float64)
    return float(s.mean()), float(s.std(unbiased=True) / math.sqrt(len(s)))


def available(lib: str) -> bool:
    if lib.startswith("tokenbounds"):
        return True
    add_peers()
    try:
        __import__(lib)
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


def _load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matvecs", type=int, default=12, help="probes (matvecs) per estimate (default 12)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats (default 5)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-library peak-memory subprocesses")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, x, y = setup()
    n = sum(p.numel() for p in model.parameters())
    load_before = _load()
    print(f"model: GPT {n} parameters, batch {BATCH} x {SEQ} tokens, {args.matvecs} probes per estimate, "
          f"{args.repeats} interleaved repeats (median)")
    print(f"host: {machine_line()}; load average (1/5/15 min) {load_before}")
    libs = [lib for lib in (*OURS, *PEERS) if available(lib)]
    Z = rademacher_probes(n, args.matvecs, seed=SAMPLE_SEED)
    results = []
    for estimator in ("hutchinson", "hutchpp"):
        runs = {lib: runner(lib, estimator, args.matvecs, model, x, y) for lib in libs}
        runs = {k: v for k, v in runs.items() if v is not None}
        wall = {k: [] for k in runs}
        cpu = {k: [] for k in runs}
        values = {}
        for run in runs.values():  # warm-up (first-call costs of every library)
            run()
        for _ in range(args.repeats):  # interleaved: every library sees the same machine load
            for lib, run in runs.items():
                w, c = time.perf_counter(), time.process_time()
                values[lib] = run()
                wall[lib].append(time.perf_counter() - w)
                cpu[lib].append(time.process_time() - c)
        for lib in runs:
            value, stderr = values[lib]
            row = {"estimator": estimator, "library": lib,
                   "ms_per_probe": 1e3 * statistics.median(wall[lib]) / args.matvecs,
                   "cpu_ms_per_probe": 1e3 * statistics.median(cpu[lib]) / args.matvecs,
                   "value": value, "stderr": stderr}
            if estimator == "hutchinson":
                row["same_probe_value"], row["same_probe_stderr"] = _mean_stderr(
                    same_probe_samples(lib, model, x, y, Z))
            if not args.no_memory:
                row["peak_mb"] = peak_memory_mib(lib, estimator, args.matvecs, torch.get_num_threads())
            results.append(row)
    load_after = _load()

    ref = {r["estimator"]: r for r in results if r["library"] == OURS[0]}
    print(f"\nours = {OURS[0]}; ratios are ours / peer (< 1: ours faster or smaller); "
          f"z = (ours - peer) / sqrt(se_ours^2 + se_peer^2) on each library's own probes")
    print(f"{'estimator':10s} {'library':18s} {'ms/probe':>9s} {'cpu ms':>7s} {'ours/peer':>9s} {'cpu o/p':>8s} "
          f"{'peak MB':>8s} {'mem o/p':>8s} {'estimate +- stderr':>20s} {'z':>6s} {'same probes':>20s}")
    for r in results:
        o = ref[r["estimator"]]
        r["ours_over_peer_time"] = o["ms_per_probe"] / r["ms_per_probe"]
        r["ours_over_peer_cpu"] = o["cpu_ms_per_probe"] / r["cpu_ms_per_probe"]
        mem = r.get("peak_mb")
        r["ours_over_peer_memory"] = (o["peak_mb"] / mem) if mem and o.get("peak_mb") else float("nan")
        # A peer without a stderr of its own (curvlinops) is given ours: the same estimator with
        # the same number of probes on the same matrix has the same standard error.
        se_p = r["stderr"] if r["stderr"] is not None else o["stderr"]
        z = (o["value"] - r["value"]) / math.hypot(o["stderr"], se_p) if o["stderr"] else float("nan")
        r["z_vs_ours"] = z
        own = f"{r['value']:.4g} +- {r['stderr']:.3g}" if r["stderr"] is not None else f"{r['value']:.4g}"
        same = (f"{r['same_probe_value']:.4g} +- {r['same_probe_stderr']:.3g}" if "same_probe_value" in r
                else "-")
        print(f"{r['estimator']:10s} {r['library']:18s} {r['ms_per_probe']:9.1f} {r['cpu_ms_per_probe']:7.1f} "
              f"{r['ours_over_peer_time']:9.3f} {r['ours_over_peer_cpu']:8.3f} "
              f"{(mem if mem is not None else float('nan')):8.0f} {r['ours_over_peer_memory']:8.3f} "
              f"{own:>20s} {z:6.2f} {same:>20s}")
    print(f"load average before/after: {load_before} -> {load_after}")
    for estimator in ("hutchinson", "hutchpp"):
        o = ref.get(estimator)
        for r in results:
            if o and r["estimator"] == estimator and r["library"] in PEERS:
                print(f"{estimator}: {OURS[0]} is {r['ms_per_probe'] / o['ms_per_probe']:.2f}x faster per probe "
                      f"than {r['library']} (CPU time {r['cpu_ms_per_probe'] / o['cpu_ms_per_probe']:.2f}x)")

    kernels: list = []
    gram_table(kernels)
    print(f"\n{'kernel':45s} {'ours s':>9s} {'peer':>24s} {'peer s':>9s} {'ours/peer':>10s}")
    for r in kernels:
        print(f"{r['kernel']:45s} {r['ours_s']:9.4f} {r['peer']:>24s} {r['peer_s']:9.4f} {r['ratio']:10.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"hessian": results, "kernels": kernels, "num_parameters": n, "load_before": load_before,
                       "load_after": load_after}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
