"""Hadamard transform on CPU, side by side in one process: ours vs the peers of peers.md (b).

Peers: ``hadamard-transform`` 0.2.0 (pure torch, from /work/main/.venv-peers), dense ``x @ H``,
and the Kronecker two-GEMM trick (H_a (x) H_b applied as H_a X H_b^T on x viewed as [a, b]).
Prints best-of-``--repeat`` times and the ratios peer / ours (> 1: ours is faster).

    python benchmarks/bench_hadamard.py [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

PEERS_SITE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          ".venv-peers", "lib", "python3.11", "site-packages")


def best_time(fn, x, repeat):
    fn(x)  # warm-up (allocations, first-call costs)
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="2 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeat = 2

    from tokenbounds.ops.hadamard import hadamard_transform
    from tokenbounds.quant.hadamard_matrices import hadamard_matrix

    if PEERS_SITE not in sys.path:
        sys.path.append(PEERS_SITE)  # at the END: our torch is used
    try:
        from hadamard_transform import hadamard_transform as peer_ht
    except ImportError as err:
        peer_ht = None
        print(f"note: hadamard-transform not importable ({err}); skipping that peer")

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"isa {getattr(__import__('tokenbounds._C', fromlist=['x']), 'cpu_isa', lambda: '?')()}")
    results = []
    for rows, n, (a, b) in [(4096, 4096, (64, 64)), (64, 32768, (128, 256))]:
        x = torch.randn(rows, n, generator=torch.Generator().manual_seed(0))
        ha = torch.from_numpy(hadamard_matrix(a)).float() / math.sqrt(a)
        hb = torch.from_numpy(hadamard_matrix(b)).float() / math.sqrt(b)

        def kron(x, ha=ha, hb=hb, a=a, b=b):
            return (ha @ x.reshape(-1, a, b) @ hb.T).reshape(x.shape)

        ours = lambda x: hadamard_transform(x)  # noqa: E731
        cands = {"ours": ours, "kronecker_2gemm": kron}
        if peer_ht is not None:
            cands["hadamard-transform-0.2.0"] = lambda x: peer_ht(x)  # noqa: E731
        if n <= 8192:
            hd = torch.from_numpy(hadamard_matrix(n)).float() / math.sqrt(n)
            cands["dense_x@H"] = lambda x, hd=hd: x @ hd.T
        # all candidates compute the same orthonormal Sylvester transform
        ref = ours(x)
        for name, fn in cands.items():
            err = float((fn(x) - ref).abs().max())
            if err > 1e-3:
                print(f"warning: {name} differs from ours by {err:g}")
        times = {name: best_time(fn, x, args.repeat) for name, fn in cands.items()}
        row = {"shape": [rows, n], "seconds": times,
               "ratio_peer_over_ours": {k: v / times["ours"] for k, v in times.items() if k != "ours"}}
        results.append(row)
        print(f"\n{rows} x {n} fp32")
        print(f"  {'impl':28s} {'seconds':>9s} {'peer/ours':>10s}")
        for name, t in times.items():
            ratio = "" if name == "ours" else f"{t / times['ours']:10.2f}"
            print(f"  {name:28s} {t:9.4f} {ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
