"""`tokenbounds quantize`: QuIP-style compression of a model into a decodable .tbq file (C = its size)."""

from __future__ import annotations

import argparse

HELP = "Quantize a local model (QuIP-style: Hadamard incoherence, LDLQ, E8) into a .tbq file; C = its size."

DESCRIPTION = """\
Quantize every linear layer of a local model (our GPT, a Hugging Face causal LM directory or a
GGUF folder) with calibration Hessians X^T X from N tokens of your data (LDLQ = GPTQ error
feedback, randomized Hadamard incoherence, uniform or E8 lattice codebook, range-coded codes),
the token/position embeddings (one more bit by default; no incoherence) and a tied LM head with
the Hessian of both uses, norms and biases in float16. Writes OUT (the .tbq: architecture, tensor names, shapes, settings, seeds, codes,
scales, checksum) and OUT.json (C and its parts, bits per parameter, per-layer proxy loss).
C = 8 x size of OUT in bits is the complexity term of the bound (it adds 2 log2 C).
A killed run resumes from OUT.partial/ (one file per finished tensor) to the same bytes.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    p = parser
    p.add_argument("--model", required=True, help="local model directory (HF causal LM, GGUF folder or tokenbounds GPT)")
    p.add_argument("--data", required=True, nargs="+", help=".bin token files (memmapped) or .txt/.jsonl text")
    p.add_argument("--out", required=True, help="the .tbq file to write (OUT.json: report; OUT.partial/: resume state)")
    p.add_argument("--bits", required=True, type=int, choices=(2, 3, 4, 8),
                   help="uniform: 2^bits levels; e8: entropy target in bits per weight (2, 3 or 4)")
    p.add_argument("--codebook", default="e8", choices=("uniform", "e8"),
                   help="scalar grid with a scale per row, or the E8 lattice (default e8)")
    p.add_argument("--method", default="ldlq", choices=("ldlq", "rtn"),
                   help="LDLQ error feedback (= GPTQ) or round-to-nearest (default ldlq)")
    p.add_argument("--no-incoherence", action="store_true", help="skip the randomized Hadamard transforms")
    p.add_argument("--calibration-tokens", type=int, default=8192, metavar="N",
                   help="tokens of --data for the Hessians, in whole windows of --seq-len (default 8192)")
    p.add_argument("--seed", type=int, default=0, metavar="K",
                   help="seeds the calibration windows and the Hadamard signs (tensor k: K + k) (default 0)")
    p.add_argument("--embedding-bits", type=int, default=None, choices=(2, 3, 4, 8),
                   help="bits of the token/position embeddings and a tied LM head (default: the next setting "
                        "above --bits; at low rates the tied embedding dominates the loss)")
    p.add_argument("--sequential", action="store_true",
                   help="calibrate each layer on the outputs of the already quantized ones (GPTQ order)")
    p.add_argument("--seq-len", type=int, default=None, help="calibration window length (default min(512, context))")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass (default 8)")
    p.add_argument("--damp", type=float, default=0.01, help="LDLQ damping, fraction of mean diag H (default 0.01)")
    p.add_argument("--token-dtype", default="uint16", choices=("uint16", "uint32"), help=".bin dtype (default uint16)")
    p.add_argument("--text-field", default="text", help="jsonl field holding the text (default 'text')")
    p.add_argument("--eot-id", type=int, default=None, help="end-of-text id for text data (default: tokenizer EOS, else 0)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory / tokenizer.json if not in --model")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model (auto when there is one)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype the model is loaded and quantized in (evaluate it in the same one)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: those of the run being resumed, else torch's choice or 1 "
                        "when the machine is busy)")
    p.add_argument("--restart", action="store_true", help="discard OUT.partial/ and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import sys

    from tokenbounds.quant.layerwise import QuantizeRunMismatch
    from tokenbounds.quant.run import QuantizeOptions, quantize_files
    from tokenbounds.quant.tbq import TBQError

    opts = QuantizeOptions(
        model=args.model, data=list(args.data), out=args.out, bits=args.bits, codebook=args.codebook,
        method=args.method, incoherence=not args.no_incoherence, calibration_tokens=args.calibration_tokens,
        seq_len=args.seq_len, seed=args.seed, sequential=args.sequential, embedding_bits=args.embedding_bits,
        damp=args.damp,
        batch_size=args.batch_size, token_dtype=args.token_dtype, text_field=args.text_field, eot_id=args.eot_id,
        gguf_file=args.gguf_file, tokenizer=args.tokenizer, dtype=args.dtype, threads=args.threads,
        restart=args.restart, progress=not args.no_progress,
    )
    try:
        report = quantize_files(opts, log=lambda msg: print(msg, file=sys.stderr))
    except (ValueError, FileNotFoundError, TBQError, QuantizeRunMismatch) as exc:
        print(f"tokenbounds quantize: error: {exc}", file=sys.stderr)
        return 2
    c = report["coded"]
    d = c["detail"]
    print(f"wrote {args.out}: C = {c['coded_bits']:,.0f} bits = {c['file_bytes']:,} bytes, "
          f"{c['bits_per_parameter']:.3f} bits/parameter over {c['num_parameters']:,} parameters "
          f"(codes {d['codes_bits']:,.0f}, scales {d['scales_bits']:,.0f}, stream models {d['side_bits']:,.0f}, "
          f"float16 tensors {d['unquantized_bits']:,.0f}, header {d['header_bits']:,.0f}); "
          f"report: {args.out}.json")
    return 0
