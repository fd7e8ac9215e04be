"""`tokenbounds evaluate`: token-level statistics and every bound for a model on its training data."""

from __future__ import annotations

import argparse

HELP = ("Evaluate a local model (HF or tokenbounds GPT) on its training tokens (windows: every position scored; "
        "a full pass or a sample of window units); write stats, bounds, report.")

EPILOG = """\
context rule: windows of T tokens (--window, default the model's context up to 1024) score their
last S targets (--stride, default T/2); every target sees >= T - S + 1 tokens except near a file
start. --per-token-contexts scores one target per forward pass instead (the paper's rule).
--prefix-token auto prepends the tokenizer's BOS to every window when it defines one.

sample: by default a full pass scores every data point once (no sampling term). --sample-tokens s
draws s data points uniformly with replacement and scores the window unit of each (cluster
sampling: the bound's sample size is s, the number of draws).

C (the model's code length) defaults to the bits of the dtype the weights are evaluated in (32 per
parameter in float32; 16 after --dtype bfloat16/float16), plus the architecture config, plus the
tokenizer when it was trained on the data (our GPT directories); or --coded-bits, --bits-per-param;
a GGUF file's size for GGUF checkpoints.

quantized models: --quantized q.tbq (from `tokenbounds quantize`) evaluates exactly the file's
decoded weights with C = 8 x its size (+ the tokenizer when counted); stats.json lists C's parts
(codes, scales, stream models, float16 tensors, header). --bits b is a shortcut that runs the same
quantizer here, with `tokenbounds quantize`'s defaults: --codebook e8 --method ldlq, randomized
Hadamard incoherence, seed 0, 8192 calibration tokens (fewer when --data holds fewer in whole
windows) in windows of min(512, context) tokens of --data; it writes OUT/quantized.tbq (resume
state: OUT/quantized.tbq.partial/) and evaluates that. Choosing b after seeing results is one
choice among several: pay it with --extra-bits.

The bound holds for a configuration fixed before seeing the sample; every run's configuration is
recorded in OUT/configurations.jsonl; pay log2(K) with --extra-bits for choosing among K.
Docs: docs/evaluation.md (statistics), docs/distributed.md (torchrun, SLURM)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("--model", required=True, help="local model directory (HF causal LM, GGUF folder or tokenbounds GPT)")
    p.add_argument("--data", required=True, nargs="+", help=".bin token files (memmapped) or .txt/.jsonl text")
    p.add_argument("--out", required=True, help="run directory (outputs, log, checkpoint)")
    p.add_argument("--window", "--context-length", dest="window", type=int, default=None, metavar="T",
                   help="T: tokens the model reads before a window's last target (default: the model's context "
                        "less the prefix token, at most 1024)")
    p.add_argument("--stride", type=int, default=None, metavar="S",
                   help="S: targets each window scores, 1 <= S <= T (default T/2)")
    p.add_argument("--sample-tokens", type=float, default=None, metavar="s",
                   help="draw s data points (e.g. 1e5) uniformly with replacement and score their window units "
                        "(default: a full pass)")
    p.add_argument("--full-pass", action="store_true",
                   help="score every data point exactly once (the default; no sampling term)")
    p.add_argument("--prefix-token", default="auto", metavar="auto|none|ID",
                   help="token prepended to every window / context: auto = the tokenizer's BOS if it defines one")
    p.add_argument("--per-token-contexts", action="store_true",
                   help="one forward pass per scored target over its own up-to-T-token context (the paper's rule; "
                        "needs --sample-tokens or --full-pass)")
    p.add_argument("--reset-at-eot", action="store_true",
                   help="start each target's context at the last end-of-text token before it (default: contexts "
                        "may cross documents)")
    p.add_argument("--seed", type=int, default=0, help="sample seed (default 0)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="units per forward pass (default: ~8192 tokens of windows; 16 per-token contexts)")
    p.add_argument("--checkpoint-every", type=int, default=8, metavar="K",
                   help="checkpoint every K batches (default 8); part of the run's identity")
    p.add_argument("--eot-id", type=int, default=None, help="end-of-text id (default: tokenizer EOS, else 0)")
    p.add_argument("--token-dtype", default="uint16", choices=("uint16", "uint32"), help=".bin dtype (default uint16)")
    p.add_argument("--text-field", default="text", help="jsonl field holding the text (default 'text')")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory / tokenizer.json if not in --model")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model (auto when there is one)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--bits", type=int, default=None, choices=(2, 3, 4, 8),
                   help="quantize here as `tokenbounds quantize --bits b` would (e8 lattice: 2-4; uniform: 2, 3, 4, "
                        "8) on calibration windows of --data, write OUT/quantized.tbq, evaluate its decoded weights "
                        "with C = its size")
    g.add_argument("--quantized", default=None, metavar="Q.TBQ",
                   help="evaluate the decoded weights of this .tbq file (of --model's architecture) with C = 8 x "
                        "its size in bytes")
    g.add_argument("--coded-bits", type=float, default=None, help="code length C of the model in bits (given)")
    g.add_argument("--bits-per-param", type=float, default=None, help="C = b x number of parameters (assumed)")
    p.add_argument("--codebook", default="e8", choices=("uniform", "e8"),
                   help="codebook of --bits (as for tokenbounds quantize; default e8)")
    p.add_argument("--method", default="ldlq", choices=("ldlq", "rtn"),
                   help="rounding of --bits: LDLQ error feedback or round-to-nearest (default ldlq)")
    p.add_argument("--tokenizer-bits", type=float, default=None,
                   help="code length of the tokenizer when it was trained on this data (default: counted for our "
                        "GPT directories, assumed fixed in advance for HF tokenizers)")
    p.add_argument("--extra-bits", type=float, default=0.0, help="bits paying for post-hoc choices (default 0)")
    p.add_argument("--train-tokens", type=float, default=None,
                   help="accepted only when equal to the data's m (the bound is about exactly the evaluated files)")
    p.add_argument("--delta", type=float, default=0.05, help="failure probability (default 0.05)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="cast the model before evaluating (that model is then what the bound is about)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, or 1 when the machine is busy)")
    p.add_argument("--restart", action="store_true", help="discard an existing checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def run(args: argparse.Namespace) -> int:
    import sys

    from tokenbounds.eval.checkpoint import CheckpointError
    from tokenbounds.eval.evaluate import EvalOptions, evaluate
    from tokenbounds.eval.hf import UnsupportedModel

    s = args.sample_tokens
    if s is not None and (s != int(s) or s < 1):
        print(f"tokenbounds evaluate: error: --sample-tokens must be a positive integer, got {s:g}", file=sys.stderr)
        return 2
    opts = EvalOptions(
        model=args.model, data=list(args.data), out=args.out, window=args.window, stride=args.stride,
        sample_tokens=None if s is None else int(s), full_pass=args.full_pass, prefix_token=str(args.prefix_token),
        per_token_contexts=args.per_token_contexts, reset_at_eot=args.reset_at_eot, seed=args.seed,
        batch_size=args.batch_size, checkpoint_every=args.checkpoint_every, eot_id=args.eot_id,
        token_dtype=args.token_dtype, text_field=args.text_field, dtype=args.dtype, device=args.device,
        bits=args.bits, codebook=args.codebook, method=args.method, quantized=args.quantized, coded_bits=args.coded_bits, bits_per_param=args.bits_per_param,
        tokenizer_bits=args.tokenizer_bits, extra_bits=args.extra_bits, train_tokens=args.train_tokens,
        delta=args.delta, gguf_file=args.gguf_file, tokenizer=args.tokenizer, restart=args.restart,
        progress=not args.no_progress, threads=args.threads, plots=not args.no_plots,
    )
    try:
        doc = evaluate(opts)
    except (CheckpointError, UnsupportedModel, ValueError, FileNotFoundError) as exc:
        print(f"tokenbounds evaluate: error: {exc}", file=sys.stderr)
        return 2
    if doc is not None:
        ev = doc["evaluation"]
        sc = ev["scoring"]
        what = "full pass" if sc["full_pass"] else f"s = {sc['draws']:,} draws"
        print(f"wrote {args.out}/stats.json, bounds.json, report.md ({sc['mode']}, {what}, {sc['scored_tokens']:,} "
              f"tokens scored, m = {ev['m']:,}, C = {ev['coded']['coded_bits']:.6g} bits: {ev['coded']['method']})")
    return 0
