"""`tokenbounds prequential`: prequential code length and excess description length of a training
run (each batch scored before the model trains on it), for nested prefixes and several seeds."""

from __future__ import annotations

import argparse

HELP = "Prequential code length and excess description length (EDL) of one training pass; JSON + PNG."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = """\
One pass over the training rows (windows of --context-length + 1 tokens, --batch-tokens per
step): each batch is scored by the model before the optimizer step that trains on it (float64
sums), then the model of every prefix n is scored on the held-out rows:

  MDL(n) = sum of the batch losses before their updates    EDL(n) = MDL(n) - N_tok(n) L_test(n)

reported per sample (row), per scored token and per trained parameter (LoRA's only with --lora).
Prefixes: --prefixes P doubling prefix lengths ending at the full pass. With the default constant
schedule every prefix is a prefix of the one run (cost: one pass + P held-out evaluations per
seed); --schedule cosine trains each prefix separately (cost ~2 passes). Seeds change the
initialisation (from scratch, or LoRA's A) and the order of the rows; means +- standard errors
are over seeds. A rerun with the same arguments reuses finished seeds and resumes an interrupted
one (out/seed-S.json, out/checkpoint-seed-S.*.pt).

Examples:
  tokenbounds prequential --model S --data corpus:kjv+shakespeare --out runs/preq-S --max-train-tokens 200000
  tokenbounds prequential --model runs/my-gpt --data kjv.bin --lora 4 --out runs/preq-lora
"""
    p.add_argument("--model", required=True,
                   help="S, M or L: the demo's GPT sizes trained from scratch; or a model directory (our GPT "
                        "or a local Hugging Face causal LM) as the pretrained start")
    p.add_argument("--data", required=True, nargs="+",
                   help=".bin token files, .txt/.jsonl text (tokenized with the model's tokenizer or "
                        "--tokenizer), or corpus:kjv+shakespeare (the offline corpora; scripts/get_corpus.sh)")
    p.add_argument("--out", required=True, help="output directory: prequential.json, prequential.png, seed-*.json")
    p.add_argument("--test-data", nargs="+", default=None,
                   help="held-out files (default: a fixed random --test-fraction of the data's rows)")
    p.add_argument("--lora", type=int, default=None, metavar="RANK",
                   help="train rank-RANK LoRA adapters on the linear layers (base frozen); EDL per parameter "
                        "then counts the adapters only")
    p.add_argument("--lora-targets", nargs="+", default=["*"], metavar="GLOB",
                   help="module-name globs of the linear layers LoRA wraps (default: all untied ones)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default 1e-2 from scratch, 1e-3 pretrained, 3e-3 with --lora)")
    p.add_argument("--batch-tokens", type=int, default=1024,
                   help="tokens per step = rows per step x context length (default 1024)")
    p.add_argument("--context-length", type=int, default=None,
                   help="tokens per row (default 32 from scratch, the model's context capped at 256)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds 0..K-1 (default 3)")
    p.add_argument("--prefixes", type=int, default=8, help="doubling prefix lengths, the last = the whole pass (default 8)")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="learning rate after warmup: constant (prefixes share one run) or cosine (one run each)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (default 0 pretrained, "
                                                                   "min(30, steps/10) from scratch)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (default 1; 0 = off)")
    p.add_argument("--no-shuffle", action="store_true",
                   help="train on the rows in stream order for every seed (default: a seeded permutation)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="share of the rows held out (default 0.1)")
    p.add_argument("--max-test-tokens", type=int, default=65536, help="cap on held-out tokens (default 65536)")
    p.add_argument("--max-train-tokens", type=int, default=None,
                   help="train on the rows of the data's first tokens only, about N tokens (the held-out rows "
                        "are then drawn from the same region)")
    p.add_argument("--information-content", action="store_true",
                   help="also score the training rows with the final model: K(h) ~ MDL - its losses "
                        "(Finzi et al.; an information-content estimate, not a valid prior); +1/3 of the cost")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary of a from-scratch GPT (default: the tokenizer's, else the largest id + 1); "
                        "vocabulary of corpus: data (default 512)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (or directory) for text data")
    p.add_argument("--token-dtype", default="uint16", choices=("uint16", "uint32"), help=".bin dtype")
    p.add_argument("--text-field", default="text", help="jsonl field holding the text (default 'text')")
    p.add_argument("--cache-dir", default="./.cache/tokenbounds", help="corpora and tokenized text cache")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, or 1 when the machine is busy)")
    p.add_argument("--restart", action="store_true", help="discard finished seeds and checkpoints in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG")


def _fail(msg: str) -> int:
    import sys

    print(f"tokenbounds prequential: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to continue (finished seeds and checkpoints are in --out)")
        return 130


def _run(args: argparse.Namespace) -> int:
    import glob
    import os

    import torch

    from ..eval.runtime import choose_threads
    from ..prequential import PrequentialConfig, run_prequential
    from ..prequential.data import load_inputs, load_model_source
    from ..prequential.report import format_table, write_outputs

    for name in ("batch_tokens", "seeds", "prefixes", "max_test_tokens"):
        if getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')} must be >= 1")
    if args.lora is not None and args.lora < 1:
        return _fail("--lora RANK must be >= 1")
    if args.lr is not None and not args.lr > 0:
        return _fail("--lr must be > 0")
    torch.set_num_threads(choose_threads(args.threads))
    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda but CUDA is not available")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    try:
        src = load_model_source(args.model, tokenizer_path=args.tokenizer)
        if args.context_length is not None:
            t = args.context_length
        elif src.kind == "scratch":
            from ..eval.pipeline import DEMO_CONFIG

            t = DEMO_CONFIG.context_length
        else:
            t = min(src.context_length or 256, 256)
        if src.context_length is not None and t > src.context_length:
            return _fail(f"--context-length {t} exceeds the model's context {src.context_length}")
        if args.batch_tokens < t:
            return _fail(f"--batch-tokens {args.batch_tokens} is smaller than one row of {t} tokens "
                         "(--context-length)")
        inputs = load_inputs(src, list(args.data), args.test_data, context_length=t, token_dtype=args.token_dtype,
                             cache_dir=args.cache_dir, text_field=args.text_field, vocab_size=args.vocab_size,
                             test_fraction=args.test_fraction, max_test_tokens=args.max_test_tokens,
                             max_train_tokens=args.max_train_tokens)
    except (ValueError, FileNotFoundError, OSError) as exc:
        return _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - corpus / tokenizer problems name themselves
        if type(exc).__name__ in ("CorpusUnavailable", "UnsupportedModel"):
            return _fail(str(exc))
        raise
    rows_per_step = args.batch_tokens // t
    steps = len(inputs.train) // rows_per_step
    if steps < 1:
        return _fail(f"a batch of {rows_per_step} rows x {t} tokens (--batch-tokens {args.batch_tokens}) is larger "
                     f"than the training data ({len(inputs.train)} rows = {len(inputs.train) * t:,} tokens); "
                     "lower --batch-tokens or add data")
    lr = args.lr or (1e-2 if src.kind == "scratch" else 3e-3 if args.lora else 1e-3)
    warm = args.warmup_steps if args.warmup_steps is not None else (
        max(1, min(30, steps // 10)) if src.kind == "scratch" else 0)
    cfg = PrequentialConfig(lr=lr, batch_rows=rows_per_step, warmup_steps=warm, schedule=args.schedule,
                            weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                            seeds=tuple(range(args.seeds)), shuffle=not args.no_shuffle, prefixes=args.prefixes,
                            information_content=args.information_content)
    if args.restart and os.path.isdir(args.out):
        for f in glob.glob(os.path.join(args.out, "seed-*.json")) + glob.glob(os.path.join(args.out, "checkpoint-*")):
            os.remove(f)
    vocab = inputs.vocab_size
    if src.kind == "pretrained" and src.vocab_size and vocab > src.vocab_size:
        return _fail(f"--vocab-size {vocab} exceeds the model's vocabulary {src.vocab_size}")
    identity = {"model": args.model, "model_fingerprint": src.fingerprint, "lora": args.lora,
                "lora_targets": list(args.lora_targets), "vocab_size": vocab, "data": inputs.info}

    def make_model(seed: int):
        return src.make(seed, vocab, t, lora_rank=args.lora, lora_targets=tuple(args.lora_targets))

    probe = make_model(0)
    print(f"{probe.description['model']}: {probe.total_parameters:,} parameters, {probe.trained_parameters:,} trained"
          f"; {len(inputs.train):,} training rows x {t} tokens ({steps:,} steps of {rows_per_step} rows, "
          f"{steps * rows_per_step * t:,} tokens), {len(inputs.test):,} held-out rows; lr {lr:g}, "
          f"{args.schedule} schedule, {args.seeds} seed(s), {device}")
    del probe
    try:
        summary = run_prequential(make_model, inputs.train, inputs.test, cfg, out_dir=args.out, identity=identity,
                                  device=device, progress=not args.no_progress)
    except ValueError as exc:
        return _fail(f"{exc} (or pass --restart)")
    summary["data"] = inputs.info
    summary["identity"] = {k: v for k, v in identity.items() if k != "data"}
    title = (f"tokenbounds prequential: {args.model}" + (f" + LoRA r={args.lora}" if args.lora else "")
             + f", {steps * rows_per_step:,} rows x {t} tokens, {args.seeds} seed(s)")
    paths = write_outputs(args.out, summary, plots=not args.no_plots, title=title)
    print(format_table(summary))
    c = summary["cost"]["per_seed"]
    print(f"cost per seed: {c['train_steps']:,} training steps in {c['training_runs']} run(s), "
          f"{c['held_out_evaluations']} held-out evaluations of {c['held_out_tokens_per_evaluation']:,} tokens "
          f"({len(summary['prefixes'])} prefixes)")
    f = summary["final"]
    print(f"EDL = {f['edl_bits']:.4g} bits = {f['edl_per_sample']:.4g} bits/sample = "
          f"{f['edl_per_token']:.4g} bits/token = {f['edl_per_parameter']:.4g} bits/trained parameter")
    if "information_content" in summary:
        ic = summary["information_content"]
        print(f"K(h) ~ {ic['k_bits']:.4g} bits ({ic['label']})")
    print("wrote " + ", ".join(paths.values()))
    return 0
