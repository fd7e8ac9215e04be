"""Check a CUDA build of tokenbounds._C on a machine without a GPU (run by `make check-cuda-build`).

    PYTHONPATH=build-cuda/lib .venv-cuda/bin/python scripts/check_cuda_build.py

Importing the extension loads every CUDA kernel and binding with all symbols resolved (a missing
launcher fails here). Then: every op of csrc/ops.cpp has a CUDA kernel (rademacher_probes, which
takes no tensor, has one for every device), a CPU kernel and a fake kernel; no op is defined that
has no fake. Exits non-zero with the list of what is missing.
"""

from __future__ import annotations

import sys

import torch


def main() -> int:
    if torch.version.cuda is None:
        print(f"torch {torch.__version__} is not a CUDA build", file=sys.stderr)
        return 1
    import tokenbounds.ops  # noqa: F401  (loads tokenbounds._C, registers the fakes)
    from tokenbounds.ops._dispatch import extension
    from tokenbounds.ops._fakes import OPS, registered_fakes

    ext = extension()
    if ext is None:
        print("tokenbounds._C did not import", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); extension {ext.__file__}")
    defined = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("tokenbounds::"))
    problems = []
    if sorted(OPS) != defined:
        problems.append(f"ops defined {defined} differ from the ops with fakes {sorted(OPS)}")
    fakes = registered_fakes()
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    print(f"{'op':22s} CUDA  CPU   fake")
    for op in OPS:
        name = f"tokenbounds::{op}"
        catch_all = has(name, "CompositeExplicitAutograd")
        cuda, cpu = has(name, "CUDA") or catch_all, has(name, "CPU") or catch_all
        print(f"{op:22s} {cuda!s:5s} {cpu!s:5s} {fakes[op]!s:5s}")
        for what, ok in (("CUDA kernel", cuda), ("CPU kernel", cpu), ("fake kernel", fakes[op])):
            if not ok:
                problems.append(f"{op}: no {what}")
    keep, floor = ext.smoothing_constants((0.0, 0.5, 1.0), 4)
    if not (keep[0] == 0.0 and floor[0] == float("-inf") and keep[2] == float("-inf")):
        problems.append(f"smoothing_constants gave {keep}, {floor}")
    for p in problems:
        print("MISSING:", p, file=sys.stderr)
    print("CUDA build OK" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
