"""``tokenbounds quantize``: a local model + its training data -> ``q.tbq`` (+ ``q.tbq.json``).

Steps: load the model (:func:`tokenbounds.eval.evaluate.load_model`: our GPT, a Hugging Face
directory or a GGUF folder), read the data (``.bin`` token files memory-mapped, ``.txt`` /
``.jsonl`` tokenized with the model's tokenizer by :func:`tokenbounds.eval.evaluate.prepare_data`),
draw the calibration windows (:func:`~tokenbounds.quant.layerwise.calibration_windows`), quantize
(:func:`~tokenbounds.quant.layerwise.quantize_model_to_tbq`, finished tensors saved in
``OUT.partial/`` so a killed run resumes), write the file atomically, then a JSON report (C and its
parts, bits per parameter, per-tensor proxy loss, bits and seconds) that is not part of the code.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .tbq import TBQError, atomic_write_bytes, load_tbq

__all__ = ["QuantizeOptions", "calibration_from_files", "quantize_files"]


@dataclass
class QuantizeOptions:
    model: str
    data: list[str]
    out: str
    bits: int
    codebook: str = "e8"
    method: str = "ldlq"
    incoherence: bool = True
    calibration_tokens: int = 8192
    seq_len: int | None = None
    seed: int = 0
    sequential: bool = False
    embedding_bits: int | None = None
    damp: float = 0.01
    batch_size: int = 8
    token_dtype: str = "uint16"
    text_field: str = "text"
    eot_id: int | None = None
    gguf_file: str | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    threads: int | None = None
    restart: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def _load_model(opts: QuantizeOptions):
    # The loader lives in the evaluation package (it moves to tokenbounds.eval.models); one loader.
    from ..eval.evaluate import load_model

    return load_model(opts.model, gguf_file=opts.gguf_file, dtype=opts.dtype, tokenizer_path=opts.tokenizer)


def _read_data(paths: list[str], lm, *, token_dtype: str, eot_id: int, cache_dir: str, text_field: str,
               vocab_size: int | None):
    from ..eval.evaluate import prepare_data

    return prepare_data(paths, lm, token_dtype=token_dtype, eot_id=eot_id, cache_dir=cache_dir,
                        text_field=text_field, vocab_size=vocab_size)


def calibration_from_files(files, num_tokens: int, seq_len: int, seed: int):
    """Calibration windows from the ``DataFile`` list of ``prepare_data`` (see calibration_windows)."""
    from .layerwise import calibration_windows

    return calibration_windows([f.tokens for f in files], num_tokens, seq_len, seed)


def _saved_threads(partial: str) -> int | None:
    try:
        with open(os.path.join(partial, "run.json")) as f:
            return int(json.load(f)["payload"]["config"]["extra"]["threads"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def quantize_files(opts: QuantizeOptions, log=print) -> dict[str, Any]:
    """Run ``tokenbounds quantize``; returns the report written next to the file."""
    import torch

    from ..eval.runtime import choose_threads
    from .layerwise import quantize_model_to_tbq
    from .weight import check_quantizer_args

    check_quantizer_args(opts.bits, opts.codebook, opts.method, None, opts.seed, opts.damp)
    if not isinstance(opts.calibration_tokens, int) or opts.calibration_tokens < 1:
        raise ValueError(f"--calibration-tokens must be a positive integer, got {opts.calibration_tokens!r}")
    if opts.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {opts.batch_size}")
    out_dir = os.path.dirname(os.path.abspath(opts.out))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"the directory of --out {opts.out} does not exist")
    partial = opts.out + ".partial"
    if opts.restart and os.path.isdir(partial):
        shutil.rmtree(partial)
    # A resumed run must repeat the first one's arithmetic: same thread count (GEMM reductions).
    threads = opts.threads or (None if opts.restart else _saved_threads(partial)) or choose_threads(None)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    lm = _load_model(opts)
    model = lm.model
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    eot = opts.eot_id if opts.eot_id is not None else (lm.eos_id if lm.eos_id is not None else 0)
    files = _read_data(list(opts.data), lm, token_dtype=opts.token_dtype, eot_id=eot,
                       cache_dir=os.path.join(partial, "tokens"), text_field=opts.text_field, vocab_size=vocab)
    seq_len = opts.seq_len or min(512, lm.context_length or 512)
    if lm.context_length is not None and seq_len > lm.context_length:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's context of {lm.context_length} tokens")
    calib = calibration_from_files(files, opts.calibration_tokens, seq_len, opts.seed)
    if lm.quantization.get("note"):
        log(f"note: {lm.quantization['note']}")
    log(f"model {opts.model} ({lm.kind}, {lm.num_parameters:,} parameters); calibration: {calib.shape[0]} "
        f"windows x {calib.shape[1]} tokens from {len(files)} file(s); {opts.bits}-bit {opts.codebook} "
        f"{opts.method}{' + RHT' if opts.incoherence else ''}{', sequential' if opts.sequential else ''}, "
        f"{threads} thread(s)")
    t_load = time.perf_counter() - t0
    tbq = quantize_model_to_tbq(
        model, calib, bits=opts.bits, codebook=opts.codebook, method=opts.method, incoherence=opts.incoherence,
        seed=opts.seed, sequential=opts.sequential, embedding_bits=opts.embedding_bits, damp=opts.damp,
        batch_size=opts.batch_size,
        partial_dir=partial, progress=opts.progress, log=log, run_extra={"threads": threads},
    )
    tbq.save(opts.out)
    written = load_tbq(opts.out)  # read back: what is on disk is what was evaluated
    if written.data != tbq.data:
        raise TBQError(f"{opts.out} does not hold the bytes just written (disk or filesystem error)")
    report = {
        "file": os.path.abspath(opts.out), "coded": written.coded_bits_report(),
        "model": {"path": os.path.abspath(opts.model), "kind": lm.kind, "num_parameters": lm.num_parameters,
                  "quantization_before": lm.quantization},
        "data": [f.info for f in files],
        "calibration": {"windows": int(calib.shape[0]), "seq_len": int(calib.shape[1]),
                        "tokens": int(calib.numel()), "seed": opts.seed},
        "options": {k: v for k, v in asdict(opts).items() if k not in ("extra",)},
        "threads": threads,
        "tensors": tbq.info["tensors"],
        "seconds": {"load": round(t_load, 3), "quantize": tbq.info["seconds"],
                    "total": round(time.perf_counter() - t0, 3)},
    }
    atomic_write_bytes(opts.out + ".json", json.dumps(report, indent=1, default=str).encode())
    shutil.rmtree(partial, ignore_errors=True)
    return report
