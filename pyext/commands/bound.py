"""`tokenbounds bound`: every bound from saved evaluation statistics (stats.json, LossStats or
UnitStats JSON), without rerunning a model."""

from __future__ import annotations

import argparse

HELP = "Compute every bound from saved evaluation statistics (stats.json)."

DESCRIPTION = """\
Reads the statistics of one evaluation and prints every applicable bound with its components.

STATS is the stats.json of `tokenbounds evaluate` (it records m, the sampling design, the coded
size, delta, the extra bits and V, so --coded-bits and --train-tokens may be omitted), a
LossStats JSON (LossStats.to_json) or a UnitStats JSON (window-unit draws). The sampling design
comes from the document: a full pass has no sampling term; window units use the s unit means
(s = draws); a per-token sample uses the s tokens. Flags that contradict the document are an
error.

Rows marked NO under 'valid' are not bounds at delta (for example the official token formula
with a sample: its smoothing choice is unpaid in the sampling term); the notes below the table
say why. 'best' is the minimum over the union-cost token and Freedman bounds, each run at
delta / K, so the choice among them is paid for.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--stats", required=True, metavar="STATS",
                        help="stats.json of `tokenbounds evaluate`, or a LossStats / UnitStats JSON file")
    parser.add_argument("--units", default=None, metavar="FILE",
                        help="UnitStats JSON of the window-unit draws, when STATS is a plain LossStats")
    parser.add_argument("--coded-bits", type=float, default=None,
                        help="raw code length C of the model in bits (2 log2 C is added); "
                             "default: the document's")
    parser.add_argument("--train-tokens", type=float, default=None,
                        help="m: number of training tokens the bound is about; default: the document's")
    parser.add_argument("--delta", type=float, default=None,
                        help="failure probability (default: the document's, else 0.05)")
    parser.add_argument("--extra-bits", type=float, default=None,
                        help="bits paying for choices made after seeing data (default: the document's, "
                             "else 0; may only add to what the evaluation recorded)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="vocabulary size, if the statistics do not record it")
    parser.add_argument("--full-pass", action="store_true", default=None,
                        help="plain LossStats that cover all m training tokens once (no sampling term)")
    parser.add_argument("--sample-reuse", type=int, default=1, metavar="K",
                        help="K configurations were compared by bounds on this same sample before this "
                             "one was chosen: every sampling term pays a union over K (add log2 K to "
                             "--extra-bits for the prior side); default 1")
    parser.add_argument("--topk", type=int, nargs="*", default=[1], help="top-k error bounds (default 1)")
    parser.add_argument("--fixed-alpha", type=float, default=None,
                        help="smoothing level of the mutual-information bound, fixed in advance "
                             "(default: the largest level)")
    parser.add_argument("--unquantized-stats", default=None, metavar="FILE",
                        help="statistics of the unquantized model on exactly the same tokens "
                             "(paired quantization gap in the Freedman decomposition)")
    parser.add_argument("--unquantized-bits", type=float, default=None,
                        help="the unquantized model's mean loss in bits, measured on the same tokens")
    parser.add_argument("--train-documents", type=float, default=None,
                        help="number of training documents (adds the document-level baseline, "
                             "illustrative: not a bound from token statistics)")
    parser.add_argument("--num-parameters", type=float, default=None,
                        help="parameter count (with --train-documents: the parameter-counting "
                             "baseline, illustrative)")
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
            units=args.units, topk=tuple(args.topk), fixed_alpha=args.fixed_alpha,
            train_documents=args.train_documents, num_parameters=args.num_parameters,
            bits_per_parameter=args.bits_per_parameter, unquantized_bits=args.unquantized_bits,
            unquantized_stats=args.unquantized_stats, sample_reuse=args.sample_reuse,
        )
    except ValueError as exc:
        print(f"tokenbounds bound: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(table.to_dict(), indent=1, allow_nan=True))
        return 0
    inp = table.inputs
    design = {"full-pass": "full pass (no sampling term)",
              "units": f"window-unit sample: s = {inp['s']:,} draws ({inp.get('unit_tokens', 0):,} tokens scored)",
              "tokens": f"per-token sample: s = {inp['s']:,} tokens"}[inp["design"]]
    print(f"m = {inp['m']:.6g} training tokens, {design}; C = {inp['coded_bits']:.6g} bits, "
          f"extra bits = {inp['extra_bits']:g}, delta = {inp['delta']}, V = {inp['vocab_size']}")
    print(table.format_table())
    return 0
