"""`tokenbounds length`: loss and bound per position bucket, inside and beyond the training context."""

from __future__ import annotations

import argparse

HELP = ("Loss and bound per position bucket from 1 to --max-length L, inside and beyond the training context T; "
        "JSON + a PNG.")

EPILOG = """\
positions: the data is cut into windows of L tokens (window = stride = L, the window rule of
`tokenbounds evaluate`), so the p-th target of a window is predicted from exactly p tokens of
context, p = 1..L; every target of the data is scored once (a full pass, no sampling term).

buckets: --buckets K geometric buckets of positions (one per position when L <= K), with the
training context T always a bucket edge, so each bucket is inside or beyond T. Bucket b's bound is
the full-pass token-level / Freedman bound (best of the candidates, paid) for the m_b targets whose
position falls in it, with the model's code length C computed as in `tokenbounds evaluate`; all B
buckets are reported, so each is at delta / B (the union is paid) and they hold together with
probability >= 1 - delta.

models: a tokenbounds GPT directory or a local Hugging Face causal LM. GPTs trained with
position_encoding rope, alibi or none accept L > T; learned absolute positions, and HF models whose
max positions are below L, are refused beyond T (with the largest --max-length they accept).

outputs: OUT/length.json (per bucket: positions, m_b, mean loss, bound; per position: count and
mean loss), OUT/length.png (loss and bound by position, log-x, T marked); OUT/checkpoint/ lets an
interrupted run resume (--restart discards it)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("--model", required=True, help="tokenbounds GPT checkpoint directory or local HF model directory")
    p.add_argument("--data", required=True, nargs="+", help=".bin token files (memmapped) or .txt/.jsonl text")
    p.add_argument("--max-length", required=True, type=int, metavar="L",
                   help="longest context scored: positions 1..L (may exceed the training context T for models "
                        "that extrapolate)")
    p.add_argument("--out", required=True, help="output directory (length.json, length.png, checkpoint/)")
    p.add_argument("--buckets", type=int, default=16, metavar="K",
                   help="number of geometric position buckets (default 16; T + 1 is always an edge)")
    p.add_argument("--delta", type=float, default=0.05,
                   help="failure probability of all bucket bounds together (default 0.05; delta / B each)")
    p.add_argument("--prefix-token", default="auto", metavar="auto|none|ID",
                   help="token prepended to every window: auto = the tokenizer's BOS if it defines one")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--bits", type=int, default=None,
                   help="quantize every tensor to a b-bit uniform grid + range coding; evaluate that model")
    g.add_argument("--coded-bits", type=float, default=None, help="code length C of the model in bits (given)")
    g.add_argument("--bits-per-param", type=float, default=None, help="C = b x number of parameters (assumed)")
    p.add_argument("--tokenizer-bits", type=float, default=None,
                   help="code length of the tokenizer when it was trained on this data (default as in evaluate)")
    p.add_argument("--extra-bits", type=float, default=0.0, help="bits paying for post-hoc choices (default 0)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default ~8192 tokens)")
    p.add_argument("--checkpoint-every", type=int, default=8, metavar="K", help="checkpoint every K batches")
    p.add_argument("--eot-id", type=int, default=None, help="end-of-text id (default: tokenizer EOS, else 0)")
    p.add_argument("--token-dtype", default="uint16", choices=("uint16", "uint32"), help=".bin dtype (default uint16)")
    p.add_argument("--text-field", default="text", help="jsonl field holding the text (default 'text')")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory / tokenizer.json if not in --model")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model (auto when there is one)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="cast the model before evaluating (that model is then what the bound is about)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to run the model (default: CUDA when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, or 1 when the machine is busy)")
    p.add_argument("--restart", action="store_true", help="discard an existing checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG")


def _summary(doc: dict) -> str:
    lines = [f"{'positions':>13} {'m_b':>10} {'loss':>8} {'bound':>8}  {'':<6}"]
    for r in doc["buckets"]:
        lo, hi = r["positions"]
        where = "beyond" if r.get("beyond_training") else ""
        if r.get("bound_bits") is None:
            lines.append(f"{lo:>6}-{hi:<6} {r['m']:>10,} {'-':>8} {'-':>8}  {where}")
            continue
        flags = " ".join(x for x in (where, "vacuous" if r["vacuous"] else "") if x)
        lines.append(f"{lo:>6}-{hi:<6} {r['m']:>10,} {r['mean_nll_bits']:>8.4f} {r['bound_bits']:>8.4f}  {flags}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import sys

    from tokenbounds.eval.checkpoint import CheckpointError
    from tokenbounds.eval.hf import UnsupportedModel
    from tokenbounds.length.positions import LengthOptions, measure_length

    opts = LengthOptions(
        model=args.model, data=list(args.data), max_length=args.max_length, out=args.out, buckets=args.buckets,
        delta=args.delta, prefix_token=str(args.prefix_token), batch_size=args.batch_size,
        checkpoint_every=args.checkpoint_every, eot_id=args.eot_id, token_dtype=args.token_dtype,
        text_field=args.text_field, tokenizer=args.tokenizer, gguf_file=args.gguf_file, dtype=args.dtype, device=args.device,
        bits=args.bits, coded_bits=args.coded_bits, bits_per_param=args.bits_per_param,
        tokenizer_bits=args.tokenizer_bits, extra_bits=args.extra_bits, threads=args.threads,
        restart=args.restart, progress=not args.no_progress, plots=not args.no_plots,
    )
    try:
        doc = measure_length(opts, log=lambda msg: print(msg, file=sys.stderr))
    except (CheckpointError, UnsupportedModel, ValueError, FileNotFoundError) as exc:
        print(f"tokenbounds length: error: {exc}", file=sys.stderr)
        return 2
    print(_summary(doc))
    print(f"wrote {args.out}/length.json" + (", length.png" if "png" in doc["files"] else "")
          + f" (m = {doc['m']:,}, T = {doc['training_context']}, L = {doc['max_length']}, {doc['union']}; "
          f"C = {doc['coded']['coded_bits']:.6g} bits: {doc['coded']['method']})")
    return 0
