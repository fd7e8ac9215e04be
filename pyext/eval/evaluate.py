"""``tokenbounds evaluate``: the statistics of a model on its training tokens and every bound,
resumable and distributed.

The steps of :func:`evaluate` (each a function below):

1. **options** are checked before anything is loaded (clear errors for bad input);
2. **model** (:mod:`.models`): loaded and cast to ``--dtype``; with ``--quantized q.tbq`` it
   carries the file's decoded weights, with ``--bits`` those of the same quantizer run here
   (:mod:`tokenbounds.quant`, after step 3: it calibrates on the evaluation's data);
3. **data** (:mod:`.data`): ``.bin`` token files memory-mapped, text tokenized once and cached;
   several files are one set of m = sum_f (n_f - 1) data points, no context crossing a file;
4. **rule and plan** (:mod:`.sample`): windows of T tokens scoring their last S targets (or
   per-token contexts), a prefix token, every unit once (full pass) or the units of s drawn data
   points (cluster sampling), in a fixed order;
5. **coded size** C: the bits of the evaluated weights, a quantizer's code, a GGUF file or a
   given number, plus the tokenizer when it was trained on the data;
6. **scoring** (:mod:`.score`, :mod:`.stats`): the plan cut into batches of B units and blocks of
   K batches; block j runs on rank j mod P and is checkpointed once (:mod:`.checkpoint`); the
   statistics are the blocks merged **in block order**, so a resumed run and a run sharded over
   any number of processes give bit-identical results;
7. **evaluation** (:mod:`.evaluation`): one frozen record of the run, written with the statistics
   into ``stats.json``; bounds and the report (:mod:`.report`) are rendered from it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..losses import DEFAULT_ALPHAS
from .checkpoint import BlockStore, CheckpointError, config_hash
from .data import DataFile, TokenStreams, prepare_data
from .evaluation import STATS_FORMAT, CodedSize, RunInfo
from .fileio import canonical_json, read_json
from .models import (
    LoadedModel,
    directory_fingerprint,
    load_model,
    tokenizer_code_bits,
    weights_code_bits,
)
from .sample import ContextRule, UnitPlan, Units, plan_units
from .score import Scorer, batch_slices
from .stats import EvalState

if TYPE_CHECKING:
    from ..quant.tbq import TBQ

__all__ = ["DEFAULT_WINDOW", "EvalOptions", "evaluate"]

log = logging.getLogger("tokenbounds.evaluate")

DEFAULT_WINDOW = 1024
"""Window T when --window is not given: the model's context (less the prefix token), at most this."""
DEFAULT_BATCH_TOKENS = 8192
"""Default batch: about this many model tokens per forward pass (windows), 16 contexts per-token."""
QUANTIZED_FILE = "quantized.tbq"
"""Where --bits writes the code of the model it evaluates (in --out)."""
QUANTIZE_SEED = 0
"""--bits: seed of the calibration windows and Hadamard signs (``tokenbounds quantize``'s default)."""


@dataclass
class EvalOptions:
    """The options of ``tokenbounds evaluate`` (see its ``--help``)."""

    model: str
    data: list[str]
    out: str
    window: int | None = None
    stride: int | None = None
    sample_tokens: int | None = None
    full_pass: bool = False
    prefix_token: str = "auto"
    per_token_contexts: bool = False
    reset_at_eot: bool = False
    seed: int = 0
    batch_size: int | None = None
    checkpoint_every: int = 8
    eot_id: int | None = None
    token_dtype: str = "uint16"
    text_field: str = "text"
    dtype: str = "float32"
    device: str = "auto"
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    bits: int | None = None
    codebook: str = "e8"
    method: str = "ldlq"
    quantized: str | None = None
    coded_bits: float | None = None
    bits_per_param: float | None = None
    tokenizer_bits: float | None = None
    extra_bits: float = 0.0
    train_tokens: float | None = None
    delta: float = 0.05
    gguf_file: str | None = None
    tokenizer: str | None = None
    restart: bool = False
    progress: bool = True
    threads: int | None = None
    plots: bool = True


def evaluate(opts: EvalOptions) -> dict[str, Any] | None:
    """Run (or resume) an evaluation; returns the stats.json content on rank 0 (None elsewhere)."""
    from . import distributed as D

    check_options(opts)
    world = D.init_from_env(opts.device)
    try:
        return _evaluate(opts, world)
    finally:
        D.shutdown(world)


def _evaluate(opts: EvalOptions, world) -> dict[str, Any] | None:
    t_start = time.perf_counter()
    device, threads = _setup(opts, world)
    lm, tbq = _load_model(opts)
    from .hf import FusedHead

    vocab = FusedHead(lm.model).vocab_size  # refuses an unsupported head before the data is read
    files, streams, eot_id = _load_data(opts, lm, vocab, world)
    if opts.bits is not None:
        tbq = _quantize_here(opts, lm, files, world, threads)
    lm.model.to(device).eval()
    head = FusedHead(lm.model)
    rule, prefix_source = _context_rule(opts, lm, streams, eot_id, head.vocab_size)
    units = Units(streams, rule.stride)
    plan = plan_units(units, rule, sample_tokens=opts.sample_tokens, seed=opts.seed)
    _check_train_tokens(opts, streams.num_points)
    coded = _coded_size(opts, lm, tbq)
    batch_size = _batch_size(opts, rule)
    config = _run_config(opts, lm, files, rule, plan, batch_size, head.vocab_size, tbq)
    scorer = Scorer(head, streams, units, rule, opts.alphas, device=device,
                    track_units=rule.mode == "windows" and not plan.full_pass)
    blocks, scored, elapsed = _score_blocks(opts, world, scorer, plan, batch_size, config)
    total = _merge_blocks(world, blocks, scorer, len(batch_slices(plan.units.size, batch_size)),
                          opts.checkpoint_every)
    if total is None:
        return None
    from .report import build_evaluation, write_outputs

    run = RunInfo(batch_size=batch_size, checkpoint_every=opts.checkpoint_every,
                  blocks=_num_blocks(plan, batch_size, opts.checkpoint_every), world_size=world.world_size,
                  device=str(device), threads=threads, config_sha256=config_hash(config),
                  seconds_total=round(time.perf_counter() - t_start, 3), seconds_eval_this_run=round(elapsed, 3),
                  tokens_this_run_rank0=scored, load_average=tuple(round(x, 2) for x in _loadavg()))
    ev = build_evaluation(total, opts=opts, lm=lm, files=files, rule=rule, prefix_source=prefix_source, plan=plan,
                          coded=coded, run=run, configuration=_record_configuration(opts.out, config))
    return write_outputs(opts.out, total, ev, plots=opts.plots)


# ----------------------------------------------------------------------------- 1. options
def check_options(opts: EvalOptions) -> None:
    """Reject inconsistent options before anything is loaded (what was wrong, what to do)."""
    if opts.full_pass and opts.sample_tokens is not None:
        raise ValueError("--full-pass evaluates every data point; it cannot be combined with --sample-tokens s "
                         "(choose one: a full pass has no sampling term, a sample is cheaper)")
    if opts.sample_tokens is not None and opts.sample_tokens < 1:
        raise ValueError(f"--sample-tokens must be a positive integer, got {opts.sample_tokens}")
    if opts.per_token_contexts and opts.sample_tokens is None and not opts.full_pass:
        raise ValueError("--per-token-contexts runs one forward pass per scored token: give --sample-tokens s "
                         "(or --full-pass to score all m tokens that way)")
    if opts.per_token_contexts and opts.stride is not None:
        raise ValueError("--stride applies to windows; --per-token-contexts scores one target per context")
    if opts.window is not None and opts.window < 1:
        raise ValueError(f"--window must be >= 1, got {opts.window}")
    if opts.stride is not None and opts.stride < 1:
        raise ValueError(f"--stride must be >= 1, got {opts.stride}")
    if opts.window is not None and opts.stride is not None and opts.stride > opts.window:
        raise ValueError(f"--stride {opts.stride} is larger than --window {opts.window}: a window scores its last "
                         "S targets and must hold their predecessors (S <= T)")
    if opts.batch_size is not None and opts.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if opts.checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be >= 1, got {opts.checkpoint_every}")
    if sum(x is not None for x in (opts.bits, opts.quantized, opts.coded_bits, opts.bits_per_param)) > 1:
        raise ValueError("give at most one of --bits, --quantized, --coded-bits, --bits-per-param (--quantized "
                         "q.tbq: C is the file's size; --bits b: C is the size of the file quantized here)")
    if opts.bits is not None:
        from ..quant.weight import check_quantizer_args

        try:
            check_quantizer_args(opts.bits, opts.codebook, opts.method, None, QUANTIZE_SEED, 0.01)
        except ValueError as exc:
            raise ValueError(f"--bits {opts.bits} --codebook {opts.codebook} --method {opts.method}: {exc}") from None
    elif (opts.codebook, opts.method) != ("e8", "ldlq"):
        raise ValueError("--codebook and --method choose the quantizer of --bits; give --bits b too (a --quantized "
                         "file carries its own settings)")
    if opts.prefix_token not in ("auto", "none"):
        try:
            if int(opts.prefix_token) < 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"--prefix-token must be auto, none or a token id, got {opts.prefix_token!r}") from None
    if not 0 < opts.delta < 1:
        raise ValueError(f"--delta must lie in (0, 1), got {opts.delta}")
    if opts.extra_bits < 0 or (opts.tokenizer_bits is not None and opts.tokenizer_bits < 0):
        raise ValueError("--extra-bits and --tokenizer-bits must be >= 0")


def _check_train_tokens(opts: EvalOptions, m: int) -> None:
    if opts.train_tokens is not None and float(opts.train_tokens) != float(m):
        raise ValueError(
            f"--train-tokens {opts.train_tokens:g} differs from the {m:,} data points of --data. The bound is about "
            "the average loss over exactly the tokens the statistics were drawn from (Azuma needs the m-token "
            "average, and the sample estimates the files' average): pass every training file as --data "
            "(or omit --train-tokens)")


# ----------------------------------------------------------------------------- 2. setup and model
def _loadavg() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (math.nan, math.nan, math.nan)


def _setup_logging(out: str, world) -> None:
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    log.propagate = False
    name = "evaluate.log" if world.world_size == 1 else f"evaluate.rank{world.rank}.log"
    fh = logging.FileHandler(os.path.join(out, name))
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(fh)
    if world.is_main:
        sh = logging.StreamHandler()
        sh.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(sh)


def _setup(opts: EvalOptions, world):
    import torch

    from . import distributed as D
    from .runtime import choose_threads

    os.makedirs(opts.out, exist_ok=True)
    D.barrier(world)
    _setup_logging(opts.out, world)
    threads = choose_threads(opts.threads)
    torch.set_num_threads(threads)
    if opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but CUDA is not available")
        return torch.device("cuda", world.local_rank), threads
    return torch.device("cpu"), threads


def _load_model(opts: EvalOptions) -> tuple[LoadedModel, TBQ | None]:
    """The model on the CPU; with --quantized, carrying the decoded weights of the file (which is
    read and checked first: a corrupt file or another architecture fails before anything else)."""
    tbq = None
    if opts.quantized is not None:
        from ..quant.tbq import load_tbq

        tbq = load_tbq(opts.quantized)
    lm = load_model(opts.model, gguf_file=opts.gguf_file, dtype=opts.dtype, tokenizer_path=opts.tokenizer)
    lm.quantization = {**lm.quantization, "fingerprint": directory_fingerprint(opts.model)}
    if tbq is not None:
        from ..quant.tbq import apply_tbq

        apply_tbq(lm.model, tbq)
        log.info("evaluating the decoded %s (%s)", opts.quantized, _tbq_method(tbq))
    return lm, tbq


def _tbq_method(tbq: TBQ) -> str:
    """The coded-size method string: the quantizer settings the file was made with."""
    q = tbq.quantizer
    return f"tbq {q['bits']}-bit {q['codebook']} {q['method']}" + ("" if q.get("incoherence") else " no-incoherence")


def _quantize_here(opts: EvalOptions, lm: LoadedModel, files: list[DataFile], world, threads: int) -> TBQ:
    """--bits: ``tokenbounds quantize`` with its defaults (e8 / ldlq unless --codebook / --method,
    incoherence, seed 0, DEFAULT_CALIBRATION_TOKENS calibration tokens or all the data holds in
    whole windows) run on rank 0 on windows of the evaluation's own --data; the file goes to
    OUT/quantized.tbq, the per-tensor resume state to OUT/quantized.tbq.partial/ (kept, so that a
    resumed evaluation decodes the same file instead of quantizing again). Every rank evaluates
    exactly that file's decoded weights."""
    import shutil

    import torch

    from ..quant.layerwise import QuantizeRunMismatch, quantize_model_to_tbq
    from ..quant.run import (
        DEFAULT_CALIBRATION_TOKENS,
        calibration_from_files,
        default_seq_len,
        saved_threads,
    )
    from ..quant.tbq import apply_tbq, load_tbq
    from . import distributed as D

    path = os.path.join(opts.out, QUANTIZED_FILE)
    partial = path + ".partial"
    error, tbq = None, None
    if world.is_main:
        try:
            if opts.restart and os.path.isdir(partial):
                shutil.rmtree(partial)
            q_threads = saved_threads(partial) or threads
            seq_len = default_seq_len(lm.context_length)
            whole = sum(int(f.tokens.size) // seq_len for f in files) * seq_len
            if whole < seq_len:
                raise ValueError(f"--bits calibrates on windows of {seq_len} tokens of --data, but no file holds "
                                 "that many; pass more data, or quantize with `tokenbounds quantize --seq-len L` and "
                                 "evaluate with --quantized")
            calib = calibration_from_files(files, min(DEFAULT_CALIBRATION_TOKENS, whole), seq_len, QUANTIZE_SEED)
            log.info("--bits %d: quantizing (%s, %d calibration windows x %d tokens of --data, seed %d, %d thread(s))",
                     opts.bits, f"{opts.codebook} {opts.method} + randomized Hadamard", calib.shape[0], seq_len,
                     QUANTIZE_SEED, q_threads)
            torch.set_num_threads(q_threads)
            try:
                tbq = quantize_model_to_tbq(lm.model, calib, bits=opts.bits, codebook=opts.codebook,
                                            method=opts.method, seed=QUANTIZE_SEED, partial_dir=partial,
                                            progress=opts.progress, log=log.info, run_extra={"threads": q_threads})
            except QuantizeRunMismatch as exc:
                raise CheckpointError(str(exc)) from None  # it names the difference and says --restart
            finally:
                torch.set_num_threads(threads)
            tbq.save(path)
        except Exception as exc:  # noqa: BLE001 -- reported on every rank below, raised on rank 0
            error = exc
    errors = [e for e in D.all_gather(world, None if error is None else str(error)) if e]
    if error is not None:
        raise error
    if errors:
        raise ValueError(f"rank 0 could not quantize the model: {errors[0]}")
    if tbq is None:
        tbq = load_tbq(path)
        apply_tbq(lm.model, tbq)
    return tbq


# ----------------------------------------------------------------------------- 3. data
def _load_data(opts: EvalOptions, lm: LoadedModel, vocab: int, world) -> tuple[list[DataFile], TokenStreams, int]:
    from . import distributed as D

    eot_id = opts.eot_id if opts.eot_id is not None else (lm.eos_id if lm.eos_id is not None else 0)
    kw = dict(tokenizer=lm.tokenizer, tokenizer_files=lm.tokenizer_files, token_dtype=opts.token_dtype,
              eot_id=eot_id, cache_dir=os.path.join(opts.out, "tokens"), text_field=opts.text_field,
              vocab_size=vocab)
    files = prepare_data(opts.data, **kw) if world.is_main else None
    D.barrier(world)
    if files is None:  # text was tokenized by rank 0; now every rank finds it in the cache
        files = prepare_data(opts.data, **kw)
    for f in files:
        top = int(np.max(f.tokens)) if f.tokens.size < (1 << 27) else None
        if top is not None and top >= vocab:
            raise ValueError(f"{f.path} contains token id {top} >= the model's vocabulary {vocab}; wrong "
                             "--token-dtype or data tokenized for another model?")
    return files, TokenStreams([f.tokens for f in files], eot_id), eot_id


# ----------------------------------------------------------------------------- 4. rule and plan
def _context_rule(opts: EvalOptions, lm: LoadedModel, streams: TokenStreams, eot_id: int,
                  vocab: int) -> tuple[ContextRule, str]:
    if opts.prefix_token == "none":
        prefix, source = None, "none"
    elif opts.prefix_token == "auto":
        prefix = lm.bos_id
        source = f"auto: {lm.bos_source}"
    else:
        prefix, source = int(opts.prefix_token), "given"
    if prefix is not None and not 0 <= prefix < vocab:
        raise ValueError(f"--prefix-token {prefix} is not a token id of the model's vocabulary (0..{vocab - 1})")
    pfx = int(prefix is not None)
    window = opts.window
    if window is None:
        window = min(DEFAULT_WINDOW, (lm.context_length or DEFAULT_WINDOW) - pfx)
    mode = "per-token" if opts.per_token_contexts else "windows"
    stride = 1 if mode == "per-token" else (opts.stride if opts.stride is not None else max(1, window // 2))
    rule = ContextRule(mode, int(window), int(stride), prefix, bool(opts.reset_at_eot), eot_id)
    rule.check_model_context(lm.context_length)
    longest = int(streams.sizes.max())
    if longest < window + 1:
        raise ValueError(f"the data is shorter than one window: the longest file holds {longest} tokens, a window "
                         f"reads {window} tokens before its last target; use --window {longest - 1} or less")
    return rule, source


def _batch_size(opts: EvalOptions, rule: ContextRule) -> int:
    if opts.batch_size is not None:
        return int(opts.batch_size)
    if rule.mode == "per-token":
        return 16
    return max(1, DEFAULT_BATCH_TOKENS // rule.model_tokens)


def _num_blocks(plan: UnitPlan, batch_size: int, every: int) -> int:
    return math.ceil(len(batch_slices(plan.units.size, batch_size)) / every)


# ----------------------------------------------------------------------------- 5. coded size
def _coded_size(opts: EvalOptions, lm: LoadedModel, tbq: TBQ | None) -> CodedSize:
    """C and how it was obtained (report.md states it); see :mod:`.models` for the default."""
    q = lm.quantization
    parts: dict[str, Any] = {}
    if opts.coded_bits is not None:
        method, parts["model"] = "given", float(opts.coded_bits)
        desc = f"{opts.coded_bits:.6g} bits given by --coded-bits (not verified)"
    elif tbq is not None:
        method, desc = _tbq_method(tbq), _tbq_description(opts, tbq)
        parts["model"] = tbq.coded_bits
        parts["tbq"] = _tbq_parts(tbq)
    elif opts.bits_per_param is not None:
        c = float(opts.bits_per_param) * lm.num_parameters
        method, parts["model"] = f"{opts.bits_per_param:g} bits/parameter", c
        desc = (f"{opts.bits_per_param:g} bits x {lm.num_parameters:,} parameters = {c:.6g} bits (assumed storage, "
                f"no entropy coding; valid only if the evaluated weights are exactly representable in "
                f"{opts.bits_per_param:g} bits each)")
    elif q.get("format") == "GGUF" and q.get("gguf_bytes"):
        c = 8.0 * q["gguf_bytes"]
        method, parts["model"] = "GGUF file size", c
        desc = (f"8 x {q['gguf_bytes']:,} bytes of the GGUF file = {c:.6g} bits: the file is a complete description "
                "of the (already quantized) weights, the architecture and the tokenizer; evaluating it in "
                f"{lm.dtype} is a fixed function of it")
    else:
        w = weights_code_bits(lm)
        method = f"{lm.dtype} weights"
        parts["model"], parts["config"] = w["weight_bits"], w["config_bits"]
        dtypes = ", ".join(f"{n:,} x {d}" for d, n in w["parameters_by_dtype"].items())
        desc = (f"the evaluated weights exactly: {dtypes} parameters = {w['weight_bits']:.6g} bits, plus "
                f"{w['config_bits']:.0f} bits of architecture config (8 per JSON character); no compression "
                "(pass --bits to quantize, --coded-bits or --bits-per-param)")
    tok_desc = _tokenizer_part(opts, lm, parts, gguf=method == "GGUF file size")
    total = float(sum(v for k, v in parts.items() if k in ("model", "config", "tokenizer")))
    return CodedSize(coded_bits=total, method=method, description=f"C = {total:.6g} bits: {desc}; {tok_desc}",
                     parts=parts)


def _tbq_parts(tbq: TBQ) -> dict[str, Any]:
    """C's parts for a .tbq: they sum to its 8 x bytes (:attr:`TBQ.coded_bits_detail`)."""
    r = tbq.coded_bits_report()
    return {**r["detail"], "file": r["file"], "file_bytes": r["file_bytes"], "sha256": r["sha256"],
            "num_parameters": r["num_parameters"], "bits_per_parameter": r["bits_per_parameter"],
            "quantizer": r["quantizer"]}


def _tbq_description(opts: EvalOptions, tbq: TBQ) -> str:
    d = tbq.coded_bits_detail
    q = tbq.quantizer
    if opts.bits is not None:
        how = (f"quantized here by tokenbounds.quant ({opts.bits}-bit {q['codebook']} {q['method']}"
               f"{' + randomized Hadamard' if q.get('incoherence') else ''}, embeddings {q.get('embedding_bits')}-bit; "
               f"{q.get('calibration_tokens'):,} calibration tokens of --data, seed {q.get('seed')}) into "
               f"{os.path.join(opts.out, QUANTIZED_FILE)}")
    else:
        how = f"the file {opts.quantized} ({_tbq_method(tbq)}, embeddings {q.get('embedding_bits')}-bit)"
    n = tbq.num_parameters
    return (f"8 x {len(tbq.data):,} bytes of {how} = {tbq.coded_bits:.6g} bits "
            f"({tbq.coded_bits / max(1, n):.3f} bits/parameter over {n:,}): range-coded codes "
            f"{d['codes_bits']:.6g}, scales {d['scales_bits']:.6g}, stream models {d['side_bits']:.6g}, float16 "
            f"tensors {d['unquantized_bits']:.6g}, header (architecture, names, shapes, settings, seeds) + checksum "
            f"{d['header_bits']:.6g}; the bound is for exactly the decoded weights that were evaluated")


def _tokenizer_part(opts: EvalOptions, lm: LoadedModel, parts: dict[str, Any], *, gguf: bool) -> str:
    if opts.tokenizer_bits is not None:
        parts["tokenizer"] = float(opts.tokenizer_bits)
        return f"tokenizer {opts.tokenizer_bits:.6g} bits (given by --tokenizer-bits)"
    if gguf:
        return "the tokenizer is inside the GGUF file"
    if lm.tokenizer_trained_on_data and lm.tokenizer_files:
        tb = tokenizer_code_bits(lm.tokenizer_files[0])
        parts["tokenizer"] = float(tb["bits"])
        parts["tokenizer_detail"] = tb
        return (f"plus the tokenizer, trained on the corpus and so part of the hypothesis: {tb['bits']:.6g} bits "
                f"({tb['method']})")
    return ("the tokenizer is not counted: it is assumed fixed before seeing this data (if it was trained on it, "
            "pass its code length with --tokenizer-bits)")


# ----------------------------------------------------------------------------- 6. scoring
def _run_config(opts, lm, files, rule, plan: UnitPlan, batch_size: int, vocab: int,
                tbq: TBQ | None = None) -> dict[str, Any]:
    """Everything that determines the statistics (the checkpoint's identity; not the number of
    processes, so a run may resume with another)."""
    config = {
        "format": STATS_FORMAT,
        "model": {"path": os.path.abspath(opts.model), "fingerprint": lm.quantization["fingerprint"]["sha256"],
                  "kind": lm.kind, "gguf_file": lm.gguf_file, "dtype": opts.dtype, "quantize_bits": opts.bits},
        "data": [{"path": f.info["path"], "sha256": f.info["sha256"], "n_tokens": f.info["n_tokens"]} for f in files],
        "rule": rule.to_dict(),
        "plan": plan.to_dict(),
        "batch_size": batch_size, "checkpoint_every": opts.checkpoint_every,
        "alphas": list(map(float, opts.alphas)), "vocab_size": vocab,
    }
    if tbq is not None:  # the evaluated weights are the file's (a quantization redone differently is another run)
        config["model"]["tbq_sha256"] = tbq.sha256
    return config


def _open_store(opts: EvalOptions, world, config: dict[str, Any]) -> BlockStore:
    from . import distributed as D

    store = BlockStore(opts.out, config)
    error = None
    if world.is_main:
        if opts.restart and store.discard():
            log.info("--restart: discarded the checkpoint in %s", store.directory)
        try:
            store.open(create=True)
        except CheckpointError as exc:
            error = str(exc)
    D.barrier(world)
    if not world.is_main:
        try:
            store.open(create=False)
        except CheckpointError as exc:
            error = str(exc)
    errors = D.all_gather(world, error)
    errors = [e for e in errors if e]
    if errors:
        raise CheckpointError(errors[0])
    return store


def _score_blocks(opts, world, scorer: Scorer, plan: UnitPlan, batch_size: int, config):
    """Score this rank's blocks (block j on rank j mod P), loading finished ones from the
    checkpoint; returns ({block: state dict}, targets scored in this run, seconds)."""
    from . import distributed as D

    store = _open_store(opts, world, config)
    slices = batch_slices(plan.units.size, batch_size)
    every = opts.checkpoint_every
    n_blocks = math.ceil(len(slices) / every)
    mine = list(range(world.rank, n_blocks, world.world_size))
    blocks: dict[int, dict[str, Any]] = {}
    error = None
    try:
        for j in mine:
            saved = store.load(j)
            if saved is not None:
                blocks[j] = saved
    except CheckpointError as exc:
        error = str(exc)
    errors = [e for e in D.all_gather(world, error) if e]
    if errors:
        raise CheckpointError(errors[0])
    unit_tokens = scorer.units.sizes(plan.units)

    def block_tokens(j: int) -> int:
        lo = slices[j * every].start
        hi = slices[min(len(slices), (j + 1) * every) - 1].stop
        return int(unit_tokens[lo:hi].sum())

    total_mine = sum(block_tokens(j) for j in mine)
    done = sum(block_tokens(j) for j in blocks)
    if world.is_main:
        _log_plan(opts, world, scorer, plan, batch_size, n_blocks, len(blocks), len(mine))
    bar = None
    if opts.progress and world.is_main:
        from tqdm import tqdm

        bar = tqdm(total=total_mine, initial=done, unit="tok", unit_scale=True, dynamic_ncols=True, smoothing=0.1,
                   desc=f"scoring{' rank 0' if world.distributed else ''}")
    slow = float(os.environ.get("TOKENBOUNDS_TEST_BLOCK_SLEEP_S", "0") or 0)
    t0 = time.perf_counter()
    scored = 0
    try:
        for j in mine:
            if j in blocks:
                continue
            state = scorer.empty_state()
            for sl in slices[j * every : (j + 1) * every]:
                n = scorer.batch(plan.units[sl], plan.weights[sl], state)
                scored += n
                if bar is not None:
                    bar.update(n)
            blocks[j] = state.state_dict()
            store.save(j, blocks[j])
            if slow:
                time.sleep(slow)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    log.info("rank %d: scored %d tokens in %.2f s (%.1f tokens/s)", world.rank, scored, elapsed,
             scored / elapsed if elapsed > 0 else float("nan"))
    return blocks, scored, elapsed


def _log_plan(opts, world, scorer: Scorer, plan: UnitPlan, batch_size, n_blocks, n_done, n_mine) -> None:
    r = scorer.rule
    what = ("a full pass over every unit" if plan.full_pass
            else f"{plan.draws:,} drawn data points in {plan.units.size:,} distinct units (seed {plan.seed})")
    log.info("%s: T = %d, S = %d, prefix token %s, %s; m = %s data points in %s units; scoring %s = %s targets; "
             "batches of %d units in %d blocks of %d, world size %d", r.mode, r.window, r.stride, r.prefix_token,
             "reset at end-of-text" if r.reset_at_eot else "contexts may cross end-of-text", f"{plan.m:,}",
             f"{plan.num_units:,}", what, f"{plan.scored_tokens:,}", batch_size, n_blocks, opts.checkpoint_every,
             world.world_size)
    if n_done:
        log.info("resuming: %d of this rank's %d blocks are in the checkpoint", n_done, n_mine)


def _merge_blocks(world, blocks: dict[int, dict[str, Any]], scorer: Scorer, n_batches: int,
                  every: int) -> EvalState | None:
    """All blocks on rank 0, merged in block order (None on the other ranks)."""
    from . import distributed as D

    gathered = D.gather_to_main(world, blocks)
    if not world.is_main:
        return None
    n_blocks = math.ceil(n_batches / every)
    merged: dict[int, dict[str, Any]] = {}
    for part in gathered:
        merged.update({int(k): v for k, v in part.items()})
    if sorted(merged) != list(range(n_blocks)):
        raise RuntimeError(f"missing blocks after gather: have {len(merged)} of {n_blocks}")
    total = scorer.empty_state()
    for j in range(n_blocks):
        total.merge(EvalState.from_state_dict(merged[j]))
    return total


# ----------------------------------------------------------------------------- 7. configurations
def _record_configuration(out: str, config: dict[str, Any]) -> dict[str, Any]:
    """Append this run's configuration to OUT/configurations.jsonl (once per distinct config) and
    return it with the number of distinct configurations this directory has seen."""
    import json

    from .fileio import atomic_write_text, json_sha256

    path = os.path.join(out, "configurations.jsonl")
    seen: list[dict[str, Any]] = []
    if os.path.exists(path):
        with open(path) as f:
            seen = [json.loads(line) for line in f if line.strip()]
    sha = json_sha256(config)
    if not any(r.get("config_sha256") == sha for r in seen):
        seen.append({"config_sha256": sha, "recorded": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": config})
        atomic_write_text(path, "".join(canonical_json(r) + "\n" for r in seen))
    return {"config": config, "config_sha256": sha, "configurations_recorded": len(seen),
            "configurations_file": os.path.abspath(path)}


def read_stats(path: str) -> dict[str, Any]:
    """The stats.json document of a run directory (or file)."""
    return read_json(os.path.join(path, "stats.json") if os.path.isdir(path) else path)
