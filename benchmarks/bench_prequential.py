"""Prequential coding and EDL: Donoway et al.'s toy tasks at full size, and Finzi et al.'s
information-content estimate for the demo's GPT sizes.

1. Toys (tokenbounds.prequential.toys, every run with its negative controls): random labels,
   the coupon collector against E[EDL]/(K Delta) = 1 - (1 + u) e^-u, and elicitation vs teaching
   on our GPT pretrained on a synthetic multi-skill mixture (full fine-tuning and LoRA). Each toy
   is timed (wall and CPU seconds, torch threads as given).
2. Information content: the demo's sizes S, M, L, each trained one epoch on its own first
   D = 20 N tokens of the offline corpus (KJV + Shakespeare, V = 512, context 32; the demo's
   optimizer and schedule, batches in order), the prequential losses recorded during training
   (:class:`tokenbounds.prequential.PrequentialRecorder`), then the final model rescoring the same
   batches: K(h) ~ MDL - sum of the final model's losses (an information-content estimate, not a
   valid prior), next to the parameter count and a 4-bit quantized coded size, with a power-law
   fit K ~ a N^b. Results per size are cached under --cache-dir (--fresh redoes them).

    python benchmarks/bench_prequential.py [--quick] [--threads 1] [--skip-finzi] [--skip-toys]

Writes benchmarks/results/prequential.md / .json + prequential_toys.png (toys) and
prequential_finzi.md / .json + prequential_finzi.png (the sweep; ``--order stream``: *_stream).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ROOT, machine_line, markdown_table, write_result  # noqa: E402
from tokenbounds.prequential import toys  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")


def timed(fn, *a, **kw):
    w, c = time.perf_counter(), time.process_time()
    out = fn(*a, **kw)
    return out, {"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c}


def run_toys(quick: bool) -> tuple[dict, dict]:
    s = 2 if quick else 1
    res, times = {}, {}
    res["random_labels"], times["random labels"] = timed(
        toys.random_labels, n=512 // s, seeds=tuple(range(8 // s)), controls=True)
    res["coupon_collector"], times["coupon collector"] = timed(
        toys.coupon_collector, K=128 // s, answers=64, u_max=8.0, seeds=tuple(range(8 // s)), controls=True)
    model, times["skill pretraining"] = timed(toys.pretrain_skill_model)
    seeds = tuple(range(4 // s))
    res["elicitation"], times["elicitation"] = timed(toys.elicitation, model, n=1024 // s, seeds=seeds,
                                                     controls=True)
    res["teaching"], times["teaching"] = timed(toys.teaching, model, u_max=32.0 / s,
                                               u_grid=(0.25, 0.5, 1, 2, 4, 8, 16, 32), seeds=seeds, controls=True)
    res["elicitation_lora"], times["elicitation LoRA r=1"] = timed(
        toys.elicitation, model, n=1024 // s, seeds=seeds, lr=1e-2, lora_rank=1)
    res["teaching_lora"], times["teaching LoRA r=1"] = timed(
        toys.teaching, model, u_max=32.0 / s, u_grid=(0.25, 0.5, 1, 2, 4, 8, 16, 32), seeds=seeds, lr=1e-2,
        lora_rank=1)
    return res, times


def _f(v, se=None, d=3):
    if v is None:
        return "-"
    return f"{v:.{d}f}" if se is None else f"{v:.{d}f} +- {se:.{d}f}"


def toy_tables(res: dict, times: dict) -> str:
    out = []
    r = res["random_labels"]["final"]
    out.append(f"**Random labels** (LookupLM, n = {r['rows']}, {res['random_labels']['num_seeds']} seeds; "
               "uniform loss 4 bits): EDL per sample, and what the wrong implementations report")
    out.append("")
    out.append(markdown_table(
        ["EDL (right)", "scored after update", "train loss as L_test", "final model as code", "final train loss",
         "L_test"],
        [[_f(r["edl_bits"] / r["rows"], (r["edl_bits_se"] or 0) / r["rows"]),
          _f(r["edl_after_update_per_sample"], r["edl_after_update_per_sample_se"]),
          _f(r["edl_train_loss_per_sample"], r["edl_train_loss_per_sample_se"]),
          _f(r["edl_final_code_per_sample"], r["edl_final_code_per_sample_se"]),
          _f(r["train_loss_bits"]), _f(r["test_loss_bits"])]]))
    c = res["coupon_collector"]
    out += ["", f"**Coupon collector** (LookupLM, K = {c['toy']['K']} concepts, Delta = {c['toy']['delta_bits']:.0f} "
            f"bits, {c['num_seeds']} seeds): EDL / (K Delta) against 1 - (1 + u) e^-u", ""]
    out.append(markdown_table(
        ["u = n/K", "theory", "measured", "scored after update", "train loss as L_test", "EDL / sample (bits)"],
        [[f"{p['u']:.2f}", _f(p["theory_fraction"]), _f(p["fraction"], p["fraction_se"]),
          _f(p["fraction_after_update"]), _f(p["fraction_train_loss"]),
          _f(p["edl_per_sample"], p["edl_per_sample_se"])] for p in c["prefixes"]]))
    out += ["", "**Elicitation vs teaching** (our GPT pretrained on 8 skills over 8 symbols; fine-tuned on one "
            "skill through the unknown-task token, or on 32 new facts; one row per step, "
            f"{res['elicitation']['num_seeds']} seeds): EDL per sample (bits) at each n", ""]
    grid = sorted({p["rows"] for k in ("elicitation", "teaching") for p in res[k]["prefixes"]})

    def cell(name, n):
        p = next((p for p in res[name]["prefixes"] if p["rows"] == n), None)
        return "" if p is None else _f(p["edl_per_sample"], p["edl_per_sample_se"])

    names = [k for k in ("elicitation", "teaching", "elicitation_lora", "teaching_lora") if k in res]
    out.append(markdown_table(["n"] + [k.replace("_lora", " LoRA r=1") for k in names],
                              [[n] + [cell(k, n) for k in names] for n in grid]))
    out += ["", markdown_table(
        ["task", "trained params", "EDL (bits)", "EDL / trained param", "final L_test (bits)",
         "EDL/n falls (n >= 64)", "rises then falls"],
        [[k.replace("_lora", " LoRA r=1"), res[k]["model"]["trained_parameters"],
          _f(res[k]["final"]["edl_bits"], res[k]["final"]["edl_bits_se"], 1),
          f"{res[k]['final']['edl_per_parameter']:.2e}", _f(res[k]["final"]["test_loss_bits"]),
          toys.decreasing(_from(res[k], 64)), toys.rise_then_fall(res[k])] for k in names])]
    out += ["", "Time per toy (this run): " + "; ".join(
        f"{k} {v['wall_s']:.1f} s wall / {v['cpu_s']:.1f} s CPU" for k, v in times.items()) + "."]
    return "\n".join(out)


def _from(summary: dict, n_min: int) -> dict:
    """The summary restricted to prefixes with at least ``n_min`` rows (per seed too)."""
    keep = [k for k, p in enumerate(summary["prefixes"]) if p["rows"] >= n_min]
    return {**summary, "prefixes": [summary["prefixes"][k] for k in keep],
            "per_seed": [{**s, "prefixes": [s["prefixes"][k] for k in keep]} for s in summary["per_seed"]]}


# ----------------------------------------------------------------------------- Finzi sweep
def finzi_size(size, corpus, cfg, cache_dir: str, fresh: bool, order: str = "shuffled") -> dict:
    """One size: train one epoch on the windows of the first D = 20 N tokens (in a seeded random
    order, or in stream order), recording the prequential losses; rescore the same batches with
    the final model; quantize it (4-bit RTN)."""
    from tokenbounds.eval.fileio import short_hash
    from tokenbounds.eval.train import TrainConfig, sequential_batch, train
    from tokenbounds.models.gpt import GPT, GPTConfig
    from tokenbounds.prequential import PrequentialRecorder, information_content_of_run

    mcfg = GPTConfig(vocab_size=corpus.vocab_size, context_length=cfg.context_length, n_layer=size.n_layer,
                     n_head=size.n_head, d_model=size.d_model)
    n_params = mcfg.num_parameters()
    b, t = cfg.batch_size, cfg.context_length
    steps = int(cfg.tokens_per_parameter * n_params) // (b * t)
    tcfg = TrainConfig(steps=steps, batch_size=b, lr=cfg.lr, seed=cfg.seed,
                       warmup_steps=max(1, min(30, steps // 10)), max_seconds=None)
    key = short_hash({"corpus": corpus.tokens_sha256, "model": mcfg.__dict__, "train": tcfg.__dict__,
                 "order": "sequential" if order == "stream" else order, "recipe": "finzi/1"})
    path = os.path.join(cache_dir, f"finzi-{size.name}-{key}.json")
    if os.path.exists(path) and not fresh:
        with open(path) as f:
            return json.load(f)
    tokens = corpus.tokens()
    if steps * b * t + 1 > len(tokens):
        raise ValueError(f"{size.name}: D = {steps * b * t} tokens exceed the corpus ({len(tokens)})")
    torch.manual_seed(cfg.seed)
    model = GPT(mcfg)
    rec = PrequentialRecorder(steps)
    perm = None if order == "stream" else np.random.default_rng([cfg.seed, 0x5EED]).permutation(steps * b)
    batches = lambda s: sequential_batch(tokens, b, t, s, order=perm)  # noqa: E731
    w = time.perf_counter()
    train(model, tokens, tcfg, progress=True, batch_fn=batches, on_step=rec, log=lambda *_: None)
    train_s = time.perf_counter() - w
    ic = information_content_of_run(model, rec, batches, progress=True)
    from tokenbounds.eval.pipeline import QuantChoice, _calibration_tokens, _quantize_candidate

    calib = _calibration_tokens(tokens, cfg)
    qm = _quantize_candidate(model, calib, QuantChoice("uniform", 4, "rtn"), cfg.seed)
    out = {"name": size.name, "parameters": n_params, "tokens": steps * b * t, "steps": steps,
           "mdl_bits": ic.mdl_bits, "final_bits": ic.final_bits, "k_bits": ic.k_bits,
           "k_bits_per_parameter": ic.k_bits / n_params, "label": ic.label,
           "mdl_bits_per_token": ic.mdl_bits / ic.num_tokens, "final_bits_per_token": ic.final_bits / ic.num_tokens,
           "quantized_coded_bits": qm.coded_bits, "quantizer": "uniform 4-bit RTN (+ embeddings, fp16 norms)",
           "train_seconds": train_s, "order": order}
    os.makedirs(cache_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)
    return out


def run_finzi(cache_dir: str, fresh: bool, quick: bool, order: str = "shuffled") -> dict:
    from tokenbounds.bounds import fit_power_law
    from tokenbounds.eval.data import build_corpus
    from tokenbounds.eval.pipeline import DEMO_CONFIG

    cfg = DEMO_CONFIG
    corpus = build_corpus(cache_dir, list(cfg.corpus), cfg.vocab_size)
    if quick:
        cfg = dataclasses.replace(cfg, tokens_per_parameter=2.0)
    rows = [finzi_size(s, corpus, cfg, cache_dir, fresh, order) for s in cfg.sizes]
    ks = [r["k_bits"] for r in rows]
    fit = fit_power_law([r["parameters"] for r in rows], ks).to_dict() if min(ks) > 0 else None
    return {"rows": rows, "fit": fit, "corpus": corpus.to_dict(), "order": order,
            "tokens_per_parameter": cfg.tokens_per_parameter}


def finzi_table(f: dict) -> str:
    rows = [[r["name"], f"{r['parameters']:,}", f"{r['tokens']:,}", f"{r['mdl_bits_per_token']:.3f}",
             f"{r['final_bits_per_token']:.3f}", f"{r['k_bits']:,.0f}", f"{r['k_bits_per_parameter']:.2f}",
             f"{r['quantized_coded_bits']:,.0f}", f"{r['train_seconds']:.0f}"] for r in f["rows"]]
    fit = f["fit"]
    return "\n".join([
        f"**Information content (Finzi et al.)**: each demo size trained one epoch on its own first D = "
        f"{f['tokens_per_parameter']:g} N tokens of {'+'.join(f['corpus']['sources'])} (V = {f['corpus']['vocab_size']},"
        " context 32, batch 32, lr 1e-2 cosine; the windows of 33 tokens "
        + ("in a seeded random order" if f["order"] == "shuffled" else "in stream order (KJV, then Shakespeare)")
        + "). K(h) ~ MDL - the final model's code of the same batches: an information-content estimate, not a "
        "valid prior.", "",
        markdown_table(["model", "N params", "D tokens", "MDL bits/token", "final bits/token", "K(h) bits",
                        "K(h) / param", "4-bit coded bits", "train s"], rows), "",
        (f"Power-law fit K(h) ~ a N^b: b = {fit['exponent']:.3f} (95% CI {fit['exponent_ci'][0]:.3f} .. "
         f"{fit['exponent_ci'][1]:.3f}), a = {fit['prefactor']:.3g}, R^2 = {fit['r_squared']:.4f} "
         f"({fit['num_points']} sizes)." if fit else "No power-law fit: some K(h) estimate is <= 0.")])


def plot_finzi(f: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = np.array([r["parameters"] for r in f["rows"]], float)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.loglog(n, [r["k_bits"] for r in f["rows"]], "o-", label="K(h) ~ MDL - final-model code")
    ax.loglog(n, [r["quantized_coded_bits"] for r in f["rows"]], "s--", label="4-bit quantized coded size")
    ax.loglog(n, 32 * n, ":", color="grey", label="32 bits x N")
    if f["fit"]:
        xx = np.geomspace(n.min(), n.max(), 50)
        ax.loglog(xx, f["fit"]["prefactor"] * xx ** f["fit"]["exponent"], "-", lw=0.8, color="C0",
                  label=f"fit N^{f['fit']['exponent']:.2f}")
    for r in f["rows"]:
        ax.annotate(r["name"], (r["parameters"], r["k_bits"]), textcoords="offset points", xytext=(4, -10))
    ax.set(xlabel="parameters N", ylabel="bits",
           title="information-content estimate (Finzi et al.), not a valid prior")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="half-size toys, D = 2 N for the sweep (a smoke run)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: tiny models)")
    ap.add_argument("--skip-toys", action="store_true")
    ap.add_argument("--skip-finzi", action="store_true")
    ap.add_argument("--cache-dir", default=os.path.join(ROOT, ".cache", "tokenbounds"))
    ap.add_argument("--fresh", action="store_true", help="retrain the sweep's models")
    ap.add_argument("--order", choices=("shuffled", "stream"), default="shuffled",
                    help="order of the sweep's training windows (stream: the corpus order, KJV then Shakespeare)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from tokenbounds.prequential.report import plot_toys

    load0 = os.getloadavg()
    header = (f"{machine_line()}; load average {load0[0]:.1f} {load0[1]:.1f} {load0[2]:.1f} at the start"
              + (" (--quick)" if args.quick else ""))
    print(header, flush=True)

    def finish(name: str, body: list[str], data: dict) -> None:
        load1 = os.getloadavg()
        text = "\n".join([header, "", *body, "", f"Load average at the end: {load1[0]:.1f} {load1[1]:.1f} "
                          f"{load1[2]:.1f}. (`python benchmarks/bench_prequential.py`)"])
        print(text, flush=True)
        if not args.quick:
            write_result(name, text, {"machine": header, **data})

    if not args.skip_toys:
        res, times = run_toys(args.quick)
        png = plot_toys(res, os.path.join(RESULTS, "prequential_toys.png"))
        finish("prequential", [toy_tables(res, times), "", f"Figure: `{os.path.relpath(png, ROOT)}`."],
               {"toys": {k: {kk: vv for kk, vv in v.items() if kk != "per_seed"} for k, v in res.items()},
                "toy_seconds": times})
    if not args.skip_finzi:
        f = run_finzi(args.cache_dir, args.fresh, args.quick, args.order)
        suffix = "" if args.order == "shuffled" else "_stream"
        png = plot_finzi(f, os.path.join(RESULTS, f"prequential_finzi{suffix}.png"))
        finish("prequential_finzi" + suffix, [finzi_table(f), "", f"Figure: `{os.path.relpath(png, ROOT)}`."],
               {"finzi": f})
    return 0


if __name__ == "__main__":
    sys.exit(main())
