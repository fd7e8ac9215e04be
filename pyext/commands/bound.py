"""`tokenbounds bound`: every bound from saved evaluation statistics (LossStats JSON)."""

from __future__ import annotations

import argparse

HELP = "Compute every bound from saved evaluation statistics (stats.json)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stats", required=True, help="LossStats JSON file (LossStats.to_json)")
    parser.add_argument("--coded-bits", type=float, required=True,
                        help="raw code length C of the model in bits (2 log2 C is added)")
    parser.add_argument("--train-tokens", type=float, required=True,
                        help="m: number of training tokens the bound is about")
    parser.add_argument("--delta", type=float, default=0.05, help="failure probability (default 0.05)")
    parser.add_argument("--extra-bits", type=float, default=0.0,
                        help="bits paying for choices made after seeing data (default 0)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="vocabulary size, if the statistics do not record it")
    parser.add_argument("--full-pass", action="store_true",
                        help="the statistics cover all m training tokens (no subsampling)")
    parser.add_argument("--topk", type=int, nargs="*", default=[1], help="top-k error bounds (default 1)")
    parser.add_argument("--train-documents", type=float, default=None,
                        help="number of training documents (adds the document-level baseline)")
    parser.add_argument("--num-parameters", type=float, default=None,
                        help="parameter count (with --train-documents: the parameter-counting baseline)")
    parser.add_argument("--bits-per-parameter", type=float, default=16.0)
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from tokenbounds.bounds import from_stats

    try:
        table = from_stats(
            args.stats, args.coded_bits, args.train_tokens, delta=args.delta,
            extra_bits=args.extra_bits, vocab_size=args.vocab_size, full_pass=args.full_pass,
            topk=tuple(args.topk), train_documents=args.train_documents,
            num_parameters=args.num_parameters, bits_per_parameter=args.bits_per_parameter,
        )
    except ValueError as exc:
        print(f"tokenbounds bound: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(table.to_dict(), indent=1, allow_nan=True))
    else:
        inp = table.inputs
        print(f"m = {inp['m']:.6g} training tokens, s = {inp['s'] if inp['s'] is not None else 'all'} "
              f"evaluated, C = {inp['coded_bits']:.6g} bits, delta = {inp['delta']}, V = {inp['vocab_size']}")
        print(table.format_table())
    return 0
