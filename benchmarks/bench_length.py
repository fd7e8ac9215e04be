"""Length generalization, measured: answer-token accuracy at T, 2T and 4T for small GPTs with
learned absolute positions, RoPE, ALiBi and no position encoding (NoPE), trained on task sizes
1..T of copy, parity, addition and key-value retrieval (seed 000's table, after Huang et al. 2025).

    python benchmarks/bench_length.py [--quick] [--seeds 0 1 2] [--threads 2] [--run-dir runs/length] [--fresh]

Trained models are cached under --run-dir (one directory per task, encoding and seed), so a
rerun only evaluates; an interrupted sweep resumes at the model it stopped in. Also times one
training step of each encoding at 1 and --threads threads side by side (ratios vs learned positions).
Writes benchmarks/results/length.{md,json,png} (``--quick``: length_quick.*, not quoted).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from _common import ROOT, machine_line, markdown_table, write_result  # noqa: E402
from tokenbounds.length.experiment import (  # noqa: E402
    DEFAULT_SEEDS,
    DEFAULT_TASKS,
    SweepConfig,
    markdown,
    plot,
    run_sweep,
)
from tokenbounds.models.gpt import POSITION_ENCODINGS  # noqa: E402


def step_times(cfg: SweepConfig, threads: list[int], repeats: int = 5) -> list[list]:
    """Seconds per training step (forward + backward + AdamW) of each encoding on copy at size T,
    measured interleaved in this process; rows: encoding, then per thread count s/step and the
    ratio to learned positions."""
    from tokenbounds.length.train import task_batch
    from tokenbounds.models.gpt import GPT, GPTConfig

    spec = DEFAULT_TASKS[0]
    task = spec.build()
    x, y = task_batch(task, spec.train_size, spec.train_size, cfg.batch_size, 0, 0).inputs_targets()
    models = {}
    for enc in POSITION_ENCODINGS:
        torch.manual_seed(0)
        m = GPT(GPTConfig(vocab_size=task.vocab_size, context_length=x.shape[1], n_layer=cfg.n_layer,
                          n_head=cfg.n_head, d_model=cfg.d_model, position_encoding=enc))
        models[enc] = (m, torch.optim.AdamW(m.parameters(), lr=1e-3))
    before = torch.get_num_threads()
    best = {(enc, t): float("inf") for enc in models for t in threads}
    for t in threads:
        torch.set_num_threads(t)
        for _ in range(repeats):  # interleaved, so load changes hit every encoding alike
            for enc, (m, opt) in models.items():
                t0 = time.perf_counter()
                for _ in range(5):
                    _, loss = m(x, y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                best[(enc, t)] = min(best[(enc, t)], (time.perf_counter() - t0) / 5)
    torch.set_num_threads(before)
    rows = []
    for enc in models:
        row = [enc]
        for t in threads:
            row += [best[(enc, t)] * 1e3, best[(enc, t)] / best[("learned", t)]]
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one seed, 60 steps, 64 examples (smoke run)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, metavar="K",
                    help=f"training seeds (default {' '.join(map(str, DEFAULT_SEEDS))}); fewer seeds give a reduced "
                         "grid, which the README text says; models of other seeds stay cached")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for training (default 2)")
    ap.add_argument("--run-dir", default=os.path.join(ROOT, "runs", "length"), help="model cache")
    ap.add_argument("--fresh", action="store_true", help="retrain every model (deletes its cache entry)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = tuple(DEFAULT_SEEDS if args.seeds is None else args.seeds)
    cfg = SweepConfig(tasks=DEFAULT_TASKS, seeds=seeds)
    name, run_dir = "length", args.run_dir
    if args.quick:
        quick_tasks = tuple(dataclasses.replace(t, steps=60) for t in DEFAULT_TASKS)
        cfg = SweepConfig(tasks=quick_tasks, seeds=seeds if args.seeds else (0,), eval_examples=64)
        name, run_dir = "length_quick", args.run_dir + "_quick"
    load0 = os.getloadavg()
    print(f"{machine_line()}; load average {load0[0]:.1f}", flush=True)
    # 2 threads only when training used them: on a loaded machine a second thread just waits
    timing_threads = sorted({1, args.threads})
    timing = step_times(cfg, timing_threads, repeats=2 if args.quick else 5)
    result = run_sweep(cfg, run_dir, fresh=args.fresh, progress=not args.no_progress)
    load1 = os.getloadavg()
    trained = [r for r in result["records"] if not r["cached"]]
    secs = [r["train_seconds"] for r in result["records"]]
    cpus = [r["train_cpu_seconds"] for r in result["records"]]
    loads = [r["train_load"] for r in result["records"]]
    png = os.path.join(ROOT, "benchmarks", "results", f"{name}.png")
    plot(result, png)
    steps = ", ".join(f"{t.name} {t.steps or cfg.steps} steps" for t in cfg.tasks)
    lengths = ", ".join(f"{t} {v['1']}/{v[str(cfg.multiples[-1])]}" for t, v in result["sequence_lengths"].items())
    timing_table = markdown_table(
        ["encoding"] + [h for t in timing_threads for h in (f"ms/step, {t} thread{'s' * (t > 1)}", "vs learned")],
        timing)
    text = "\n".join([
        f"{machine_line()}; load average {load0[0]:.1f} at the start, {load1[0]:.1f} at the end.",
        "",
        f"GPT with {cfg.n_layer} layers, {cfg.n_head} heads, d = {cfg.d_model} "
        f"({result['records'][0]['parameters']:,} parameters on copy); AdamW ({steps}) on batches "
        f"of {cfg.batch_size} sequences with task sizes uniform in 1..T, loss on answer tokens only; "
        f"scored on {cfg.eval_examples} fresh sequences per size (greedy, teacher-forced). "
        f"Accuracy of the answer tokens: mean (min-max) over seeds {list(cfg.seeds)}"
        + ("" if set(DEFAULT_SEEDS) <= set(cfg.seeds) else
           f" (a reduced grid: the full sweep trains seeds {list(DEFAULT_SEEDS)}, too long for the time "
           "this run had" + ("; one seed, so no spread" if len(cfg.seeds) == 1 else "") + ")")
        + ". "
        "Learned absolute positions are scored at T only (n/a): their embeddings exist for the "
        "trained positions alone, so the model refuses longer inputs. Tokens per sequence at T / "
        f"{cfg.multiples[-1]}T: {lengths}.",
        "",
        markdown(result),
        "",
        f"![answer-token accuracy by length](benchmarks/results/{name}.png)",
        "",
        f"Sweep cost: {len(result['records'])} models, {len(trained)} trained in this run "
        f"({sum(r['train_seconds'] for r in trained):.0f} s wall; the others from the cache in the run directory, "
        f"trained by an earlier run of this script), {args.threads} thread(s); training "
        f"{min(secs):.0f}-{max(secs):.0f} s wall and {min(cpus):.0f}-{max(cpus):.0f} s CPU per model "
        f"(load average {min(loads):.1f}-{max(loads):.1f} when each was trained); "
        f"evaluation {sum(r['eval_seconds'] for r in result['records']):.0f} s in all.",
        "",
        "Training step time by encoding (copy at T, measured interleaved in one process):",
        "",
        timing_table,
    ])
    print(text)
    write_result(name, text, {"machine": machine_line(), "load": [load0[0], load1[0]], "threads": args.threads,
                              "step_times": timing, **result})
    if not args.quick:  # the README quotes benchmarks/results/length.md between its markers
        sys.path.insert(0, os.path.join(ROOT, "scripts"))
        import update_readme

        update_readme.main([name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
