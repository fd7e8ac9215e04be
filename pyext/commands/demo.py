"""`tokenbounds demo`: the full pipeline (issue 6) — three GPT models of increasing size trained
at a compute-optimal token budget on an offline corpus, each quantized with the best of a paid
grid of `tokenbounds.quant` quantizers, evaluated in a full pass over every training token (the
engine of `tokenbounds evaluate`: windows, fused head; no sampling term), and every bound reported
in one table (markdown + JSON) and one PNG plot. ``--compression SPEC ...`` adds compressed
parametrizations (issue 15: LoRA, SubLoRA, subspace, Kronecker, Monarch) to the same paid grid.

The steps and the accounting are documented in :mod:`tokenbounds.eval.pipeline`.
"""

from __future__ import annotations

import argparse

HELP = ("Train 3 small GPTs at D = 20 N on an offline corpus, quantize each (best of a paid grid), "
        "and report every bound vs model size (table + plot).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.epilog = (
        "Everything is cached under --cache-dir (corpus, trained models, quantized candidates, "
        "statistics): a rerun only reads files; --fresh retrains. Ctrl-C during training keeps a "
        "checkpoint and rerunning continues from it. Install the corpus first with "
        "scripts/get_corpus.sh (or `make demo`, which does both)."
    )
    p.add_argument("--out", default="runs/demo",
                   help="output directory: report.md, results.json, bounds.png, stats/<model>.json")
    p.add_argument("--cache-dir", default="./.cache/tokenbounds",
                   help="where corpora, downloads, trained and quantized models and statistics are cached")
    p.add_argument("--fresh", action="store_true",
                   help="retrain the models (and redo quantization and evaluation) even if cached")
    p.add_argument("--delta", type=float, default=None, help="failure probability of each bound (default 0.05)")
    p.add_argument("--tiny", action="store_true",
                   help="a seconds-long run on a built-in text with 3 tiny models (for tests; vacuous bounds)")
    p.add_argument("--compression", action="append", metavar="SPEC[,SPEC...]", default=None,
                   help="compressed parametrizations to add to the paid grid at every model size, each trained "
                        "from its seeded init (the frozen base of lora / sublora costs its seed) with the "
                        "dense model's training config (the same D tokens in the same order) and coded with "
                        "every quantizer of the grid (subspace coordinates: its rtn variants only); K, and so "
                        "the log2 K bits every bound pays, counts them all. tokenbounds.compress specs, "
                        "comma-separated (or the option repeated): 'sublora:rank=4,d=2000', 'lora:rank=4', "
                        "'subspace:d=2000', 'kron:rank=2', 'monarch:blocks=4', 'kron+subspace:d=1000' (an "
                        "item key=value continues the previous spec); a lora / sublora spec with "
                        "base=LABEL (e.g. 'lora:rank=4,base=uniform4-ldlq') trains on the dense model "
                        "quantized with the grid's quantizer LABEL instead, its code counted. Each adds a "
                        "training run per model "
                        "size. By default none: the dense model only, within make demo's budget")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; 0 = automatic (1 when the machine is already busy, since "
                        "OpenMP threads competing for cores run many times slower, else torch's default)")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue from the cache")
        return 130


def _run(args: argparse.Namespace) -> int:
    import dataclasses
    import os
    import shutil
    import time

    import torch

    from ..eval.data import CorpusUnavailable
    from ..eval.fileio import atomic_path, atomic_write_json, atomic_write_text
    from ..eval.pipeline import (
        DEMO_CONFIG,
        TINY_CONFIG,
        format_markdown,
        grid_candidates,
        run_pipeline,
        scale_summary,
    )
    from ..eval.plots import plot_scaling

    t0 = time.perf_counter()
    cfg = TINY_CONFIG if args.tiny else DEMO_CONFIG
    changes = {}
    if args.delta is not None:
        if not 0 < args.delta < 1:
            print(f"error: --delta must lie in (0, 1), got {args.delta}")
            return 2
        changes["delta"] = args.delta
    if args.compression:
        from ..compress import split_specs

        try:
            changes["compression"] = tuple(sp for text in args.compression for sp in split_specs(text))
        except ValueError as e:
            print(f"error: --compression: {e}")
            return 2
    cfg = dataclasses.replace(cfg, **changes)
    try:
        k_cand = len(grid_candidates(cfg))
    except ValueError as e:
        print(f"error: {e}")
        return 2
    from tokenbounds.eval.runtime import choose_threads

    threads = choose_threads(args.threads)
    torch.set_num_threads(threads)
    print(f"tokenbounds demo: {len(cfg.sizes)} models, D = {cfg.tokens_per_parameter:g} N tokens each, "
          f"{k_cand} candidates ({len(cfg.grid)} quantizers"
          + (f"; compression {', '.join(cfg.compression)}" if cfg.compression else "")
          + "), a full pass over the corpus per model (windows of "
          f"{cfg.context_length} tokens scoring {cfg.eval_stride}), {threads} thread(s)")
    try:
        result = run_pipeline(cfg, args.cache_dir, fresh=args.fresh, progress=not args.no_progress)
    except CorpusUnavailable as e:
        print(f"error: {e}")
        return 1
    except ValueError as e:
        print(f"error: {e}")
        return 2

    out = args.out
    os.makedirs(os.path.join(out, "stats"), exist_ok=True)
    for m in result["models"]:
        dst = os.path.join(out, "stats", f"{m['name']}.json")
        with atomic_path(dst) as tmp:
            shutil.copyfile(m["stats_path"], tmp)
        m["stats_file"] = dst
    result["seconds"]["wall_total"] = time.perf_counter() - t0
    result["torch_threads"] = threads
    png = plot_scaling(result, os.path.join(out, "bounds.png"))
    md = format_markdown(result)
    atomic_write_text(os.path.join(out, "report.md"), md)
    atomic_write_json(os.path.join(out, "results.json"), result)

    print()
    table = md.split("\n\n")[2]  # the summary table
    print(table)
    print()
    for line in scale_summary(result):
        print(line)
    print()
    print(f"time {result['seconds']['wall_total']:.1f} s; wrote {out}/report.md, {out}/results.json, {png}")
    m0 = result["models"][0]
    print("every bound of one model from its statistics: tokenbounds bound --stats "
          f"{m0['stats_file']} --coded-bits {m0['code_length']['coded_bits']!r} --train-tokens "
          f"{result['train_tokens_m']} --extra-bits {result['extra_bits']!r} --delta {cfg.delta:g} --full-pass")
    return 0
