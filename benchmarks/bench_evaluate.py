"""Throughput of `tokenbounds evaluate` (fused head) vs a naive HF loop, same model and sample (CPU).

    python benchmarks/bench_evaluate.py [--quick] [--threads 2] [--json PATH]

Model: a tiny randomly initialised GPT-2 with the real GPT-2 vocabulary (V = 50257, d = 128,
2 layers), so the LM head dominates as it does in real LMs. Sample: s sampled tokens of a
random token file, each with its own context of up to 128 tokens (the token-level bound's
sampling). Every variant scores identical batches:

* ours, fused loop: body -> final hidden state at the last context position ->
  ``linear_smoothed_nll`` (8 smoothing levels + rank), no logits matrix;
* ours, ``evaluate()`` end to end (sampling, batching, checkpoints every 8 batches, statistics);
* naive HF (what the official token-bounds code does): ``model(input_ids).logits`` for every
  position ([B, T, V]), softmax of the last position, a full descending sort for the rank, one
  smoothing expression per alpha;
* naive HF, last position only (``logits_to_keep=1``): the same with only [B, 1, V] logits.

Prints tokens/s and the ratios; target: fused / naive >= 3x. Writes benchmarks/results/evaluate.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import machine_line, markdown_table, write_result  # noqa: E402
from tokenbounds.losses import DEFAULT_ALPHAS, LossStats  # noqa: E402

V = 50257
LN2 = math.log(2.0)


def build(tmp: str, n_tokens: int, seed: int = 0):
    from tokenbounds.eval.data import write_tokens
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=256, n_embd=128, n_layer=2, n_head=4,
                                       bos_token_id=0, eos_token_id=0)).eval()
    model.save_pretrained(os.path.join(tmp, "model"))
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, V, size=n_tokens).astype(np.uint16)
    ids[:: 509] = 0
    write_tokens(os.path.join(tmp, "data.bin"), ids)
    return model, ids


def batches(ids, sample, batch_size):
    lengths = sample.context_lengths
    order_all = np.argsort(-lengths, kind="stable")
    out = []
    for b0 in range(0, order_all.size, batch_size):
        order = order_all[b0 : b0 + batch_size]
        lens = lengths[order]
        x = np.zeros((order.size, int(lens.max())), dtype=np.int64)
        for r, k in enumerate(order):
            x[r, : lens[r]] = ids[sample.starts[k] : sample.positions[k]]
        out.append((torch.from_numpy(x), torch.from_numpy(lens - 1),
                    torch.from_numpy(ids[sample.positions[order]].astype(np.int64))))
    return out


def run_fused(model, data):
    from tokenbounds.eval.hf import FusedHead

    head = FusedHead(model)
    stats = LossStats(vocab_size=V)
    with torch.no_grad():
        for x, last, y in data:
            h = head.hidden_states(x)[torch.arange(x.shape[0]), last]
            stats.update(head.losses(h, y, DEFAULT_ALPHAS))
    return stats


def naive_scores(last_logits, y):
    """Official-code style: softmax, full sort for the rank, per-alpha smoothed loss (bits)."""
    p = torch.softmax(last_logits.float(), dim=-1)
    sorted_idx = torch.argsort(p, dim=-1, descending=True)
    rank = (sorted_idx == y[:, None]).nonzero()[:, 1]
    py = p.gather(1, y[:, None])[:, 0].double()
    nll = torch.stack([-torch.log2((1 - a) * py + a / V) for a in DEFAULT_ALPHAS], dim=1)
    return nll, rank


def run_naive(model, data, keep_last: bool):
    sums = torch.zeros(len(DEFAULT_ALPHAS), dtype=torch.float64)
    n = 0
    with torch.no_grad():
        for x, last, y in data:
            if keep_last:
                # right-padded rows have different last positions: run each length group separately
                rows = []
                for L in torch.unique(last):
                    sel = last == L
                    rows.append((sel, model(input_ids=x[sel, : int(L) + 1], logits_to_keep=1).logits[:, -1]))
                logits = torch.empty((x.shape[0], V))
                for sel, lg in rows:
                    logits[sel] = lg.float()
            else:
                logits = model(input_ids=x).logits[torch.arange(x.shape[0]), last]
            nll, _ = naive_scores(logits, y)
            sums += nll.sum(0)
            n += x.shape[0]
    return sums / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tokens (CI smoke run)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--sample-tokens", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results to this JSON path")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    s = args.sample_tokens or (64 if args.quick else 256)
    ctx, bs = 128, 16
    from tokenbounds.eval.evaluate import EvalOptions, MultiTokens, draw_sample, evaluate

    with tempfile.TemporaryDirectory() as tmp:
        model, ids = build(tmp, 200_000)
        sample = draw_sample(MultiTokens([ids]), s, context_length=ctx, seed=0, eot_id=0)
        data = batches(ids, sample, bs)
        run_fused(model, data[:1])  # warm-up
        run_naive(model, data[:1], False)
        results = {}
        for name, fn in (("fused", lambda: run_fused(model, data)),
                         ("naive HF (all-position logits + softmax + sort)", lambda: run_naive(model, data, False)),
                         ("naive HF, last position only", lambda: run_naive(model, data, True))):
            t0 = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t0
            results[name] = {"seconds": dt, "tokens_per_s": s / dt}
            if name == "fused":
                fused_mean = out.mean.copy()
            else:
                np.testing.assert_allclose(out.numpy(), fused_mean, rtol=2e-4)  # same numbers
        opts = EvalOptions(model=os.path.join(tmp, "model"), data=[os.path.join(tmp, "data.bin")],
                           sample_tokens=s, out=os.path.join(tmp, "run"), context_length=ctx, batch_size=bs,
                           checkpoint_every=8, progress=False, plots=False, threads=args.threads)
        doc = evaluate(opts)
        t_eval = doc["evaluation"]["run"]["seconds_eval_this_run"]
        results["evaluate() end to end"] = {"seconds": t_eval, "tokens_per_s": s / t_eval}
        np.testing.assert_allclose(doc["mean"], fused_mean, rtol=1e-5)
    base = results["naive HF (all-position logits + softmax + sort)"]["tokens_per_s"]
    rows = [[k, v["tokens_per_s"], v["tokens_per_s"] / base] for k, v in results.items()]
    table = markdown_table(["variant", "tokens/s", "vs naive HF"], rows)
    ratio = results["fused"]["tokens_per_s"] / base
    ratio_e2e = results["evaluate() end to end"]["tokens_per_s"] / base
    text = (f"### evaluate throughput (CPU; GPT-2 shape d=128, 2 layers, V={V}; s={s}, context <= {ctx}, "
            f"batch {bs})\n\n{machine_line()}\n\n{table}\n\nfused / naive HF = {ratio:.2f}x "
            f"(evaluate() end to end: {ratio_e2e:.2f}x); target >= 3x")
    print(text)
    data_out = {"machine": machine_line(), "sample_tokens": s, "context": ctx, "batch": bs, "vocab": V,
                "results": results, "ratio_fused_vs_naive": ratio, "ratio_evaluate_vs_naive": ratio_e2e}
    write_result("evaluate", text, data_out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data_out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
