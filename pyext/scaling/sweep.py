"""The compute-optimal scaling sweep (issue 16; Finzi et al. 2025, Figure 2, measured on CPU).

For each model size N (parameters, tied embedding counted once; ``GPTConfig.num_parameters``):

1. **Data**: its own first ``D = tokens_per_parameter * N`` tokens of the shuffled-chunk corpus
   (:mod:`tokenbounds.scaling.corpus`), rounded down to whole batches: ``steps * B * T`` targets,
   the token prefix ``tokens[: D + 1]`` (it starts with an end-of-text token).
2. **Train one epoch** over exactly those tokens, in order
   (:func:`tokenbounds.eval.train.sequential_batch`: every target once), AdamW with warmup +
   cosine decay (:func:`tokenbounds.eval.train.train`, checkpointed and resumable).
3. **Quantize** with the demo's paid grid machinery (:func:`tokenbounds.eval.pipeline._quantize_candidate`:
   every linear layer, then the embeddings, fp16 for the rest) for each of K candidates (uniform
   and E8 codebooks, 2-8 bits, LDLQ and RTN); each candidate is scored on a window-unit sample of
   the model's own training tokens (its own seed) by the bound it would get, and the best is
   kept: the choice is paid as ``log2 K`` prior bits (a union bound over the grid, spec/bounds.md
   section 9), so it may look at the data.
4. **Bound over m = D** (its own training set) from a **full pass** of the chosen dequantized
   model (windows of T tokens scoring all T targets: the training windows themselves) and of the
   unquantized model on the same tokens (the paired quantization gap of Finzi's decomposition):
   :func:`tokenbounds.bounds.from_stats` with ``full_pass=True``, so there is no sampling term.

Every step is cached per model under ``cache_dir/scaling/<hash>`` (a killed run loses at most the
model in progress: training resumes from its checkpoint, candidates and passes are atomic files).
Each finished model is written to ``<out>/models/<name>.json`` with its statistics document
``<out>/stats/<name>.json`` and the ``tokenbounds bound`` command that recomputes its bound.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..eval.fileio import atomic_path, atomic_write_json, read_json, short_hash
from ..eval.pipeline import ModelSize, QuantChoice, choice_cost_bits

__all__ = [
    "DEFAULT_SIZES",
    "SCALING_CONFIG",
    "SCALING_GRID",
    "TINY_SCALING_CONFIG",
    "ScalingConfig",
    "learning_rate",
    "model_tokens",
    "run_model",
    "run_sweep",
    "sweep_plan",
]

SCALING_GRID: tuple[QuantChoice, ...] = tuple(
    [QuantChoice("uniform", b, "ldlq") for b in (2, 3, 4, 8)]
    + [QuantChoice("e8", b, "ldlq") for b in (2, 3, 4)]
    + [QuantChoice("uniform", 4, "rtn")]
)
"""K = 8 candidates (log2 K = 3 prior bits): 2/3/4/8-bit uniform LDLQ, 2/3/4-bit E8 LDLQ, and
4-bit round-to-nearest as the plain baseline."""

DEFAULT_SIZES: tuple[ModelSize, ...] = (
    ModelSize("XS", 1, 2, 8),
    ModelSize("S", 1, 2, 16),
    ModelSize("M", 2, 4, 32),
    ModelSize("L", 2, 4, 48),
    ModelSize("XL", 3, 4, 64),
    ModelSize("XXL", 3, 4, 80),
)
"""N = 5.5k .. 280k with V = 512, T = 64 (51x; XS..XL alone span 34x)."""


@dataclass(frozen=True)
class ScalingConfig:
    """Everything a sweep's results depend on (hashed into its cache keys).

    Learning rate: ``min(lr_max, lr_ref * d_ref / d_model)`` (:func:`learning_rate`; a width-scaled
    rule fixed before the sweep, not tuned per size). ``selection_bits`` pays for this
    configuration's hyper-parameters (vocabulary, context, widths, learning-rate rule, grid),
    chosen while developing on this corpus: 10 bits = up to 1024 configurations. ``select_draws``
    window units of each model's training tokens (seed ``select_seed``, used for nothing else)
    choose its quantizer."""

    sources: tuple[str, ...] = ("kjv", "shakespeare", "gcide", "pydocs")
    vocab_size: int = 512
    chunk_chars: int = 4000
    shuffle_seed: int = 0
    context_length: int = 64
    sizes: tuple[ModelSize, ...] = DEFAULT_SIZES
    tokens_per_parameter: float = 20.0
    batch_size: int = 16
    lr_max: float = 1e-2
    lr_ref: float = 5e-3
    d_ref: int = 64
    warmup_fraction: float = 0.05
    seed: int = 0
    grid: tuple[QuantChoice, ...] = SCALING_GRID
    calibration_sequences: int = 128
    calibration_seed: int = 3
    select_draws: int = 400
    select_seed: int = 48271
    eval_batch_size: int = 256
    delta: float = 0.05
    selection_bits: float = 10.0
    min_corpus_tokens: int = 30_000_000

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid"] = [asdict(c) | {"label": c.label} for c in self.grid]
        return d

    # the names the demo's helpers read (_calibration_tokens, _score)
    @property
    def eval_stride(self) -> int:
        return self.context_length


SCALING_CONFIG = ScalingConfig()
TINY_SCALING_CONFIG = ScalingConfig(
    sources=("tiny",), vocab_size=300, context_length=16,
    sizes=(ModelSize("A", 1, 2, 8), ModelSize("B", 1, 2, 16)),
    tokens_per_parameter=1.0, batch_size=8,
    grid=(QuantChoice("uniform", 2, "rtn"), QuantChoice("uniform", 4, "ldlq"), QuantChoice("e8", 2, "ldlq")),
    calibration_sequences=8, select_draws=20, eval_batch_size=64, min_corpus_tokens=0,
)
"""Seconds-long: two tiny models on the built-in text (for tests; D = N so the built-in text suffices)."""


def learning_rate(size: ModelSize, cfg: ScalingConfig) -> float:
    """Peak learning rate of ``size``: ``min(lr_max, lr_ref * d_ref / d_model)`` (Adam's update
    size per weight shrinks ~ 1/width for stable training, cf. muP, Yang et al. 2021)."""
    return float(min(cfg.lr_max, cfg.lr_ref * cfg.d_ref / size.d_model))


def _gpt_config(size: ModelSize, cfg: ScalingConfig, vocab: int):
    from ..models.gpt import GPTConfig

    return GPTConfig(vocab_size=vocab, context_length=cfg.context_length, n_layer=size.n_layer,
                     n_head=size.n_head, d_model=size.d_model, dropout=0.0)


def model_tokens(num_parameters: int, cfg: ScalingConfig) -> tuple[int, int]:
    """(training steps, D): one epoch over ``D = steps * B * T`` targets, the largest whole number
    of batches within ``tokens_per_parameter * N`` (at least one batch)."""
    per_step = cfg.batch_size * cfg.context_length
    steps = max(1, int(cfg.tokens_per_parameter * num_parameters // per_step))
    return steps, steps * per_step


def sweep_plan(cfg: ScalingConfig, vocab: int | None = None) -> list[dict[str, Any]]:
    """Per size: N, D, steps and the FLOPs (training 6 N D; two full passes 2 x 2 N D; the
    selection passes 2 N x K x draws x T), for cost estimates before running."""
    v = cfg.vocab_size if vocab is None else vocab
    out = []
    for size in cfg.sizes:
        n = _gpt_config(size, cfg, v).num_parameters()
        steps, d = model_tokens(n, cfg)
        select_tokens = len(cfg.grid) * cfg.select_draws * cfg.context_length
        out.append({"name": size.name, "parameters": n, "tokens": d, "steps": steps,
                    "lr": learning_rate(size, cfg),
                    "flops_train": 6.0 * n * d, "flops_eval": 4.0 * n * d, "flops_select": 2.0 * n * select_tokens,
                    "flops_total": 6.0 * n * d + 4.0 * n * d + 2.0 * n * select_tokens})
    return out


@dataclass
class _Data:
    """One model's training set: the token prefix, its streams, units and plans."""

    tokens: Any
    streams: Any
    rule: Any
    units: Any
    full: Any
    select: Any
    m: int = field(default=0)


def _model_data(corpus_tokens, d_tokens: int, cfg: ScalingConfig, eot_id: int) -> _Data:
    from ..eval.data import TokenStreams
    from ..eval.sample import ContextRule, Units, plan_units

    prefix = corpus_tokens[: d_tokens + 1]
    streams = TokenStreams([prefix], eot_id)
    rule = ContextRule("windows", cfg.context_length, cfg.context_length)
    units = Units(streams, rule.stride)
    full = plan_units(units, rule, sample_tokens=None, seed=0)
    select = plan_units(units, rule, sample_tokens=cfg.select_draws, seed=cfg.select_seed)
    return _Data(prefix, streams, rule, units, full, select, m=streams.num_points)


PASSES = ("q", "fp")
"""The two full passes of a model: the chosen quantized model ("q") and the unquantized one ("fp")."""


def run_model(size: ModelSize, cfg: ScalingConfig, corpus, cache_dir: str, *, progress: bool = True,
              passes: tuple[str, ...] = PASSES, log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Train, quantize (best of the paid grid), score and bound one size (cached; see the
    module docstring). Returns the model's JSON-able record, or None when ``passes`` leaves out a
    full pass that is not cached yet (``passes=("fp",)`` in a second process computes the
    unquantized pass while the first computes the quantized one; each reads the other's file)."""
    import torch

    from ..bounds import from_stats, training_flops
    from ..eval.pipeline import (
        QUANT_RECIPE,
        _calibration_tokens,
        _predicted_bound,
        _quantize_candidate,
        _score,
    )
    from ..eval.score import stats_document
    from ..eval.stats import EvalState
    from ..eval.train import TrainConfig, sequential_batch, train
    from ..losses import LossStats
    from ..models.gpt import GPT

    V = corpus.vocab_size
    mcfg = _gpt_config(size, cfg, V)
    n_params = mcfg.num_parameters()
    steps, d_tokens = model_tokens(n_params, cfg)
    if d_tokens + 1 > corpus.n_tokens:
        raise ValueError(f"model {size.name} (N={n_params:,}) needs D = {d_tokens:,} training tokens but the "
                         f"corpus holds {corpus.n_tokens:,}; add sources or lower tokens_per_parameter")
    data = _model_data(corpus.tokens(), d_tokens, cfg, corpus.eot_id)
    m = data.m
    if m != d_tokens:
        raise RuntimeError(f"internal: m = {m} != D = {d_tokens}")
    lr = learning_rate(size, cfg)
    tcfg = TrainConfig(steps=steps, batch_size=cfg.batch_size, lr=lr, seed=cfg.seed,
                       warmup_steps=max(1, round(cfg.warmup_fraction * steps)), max_seconds=None)
    model_key = {"corpus": corpus.tokens_sha256, "model": asdict(mcfg), "train": asdict(tcfg),
                 "data": {"first_tokens": d_tokens + 1, "batches": "sequential_batch, one epoch"}}
    mdir = os.path.join(cache_dir, "scaling", f"{size.name}-{short_hash(model_key)}")
    os.makedirs(mdir, exist_ok=True)
    k_cand = len(cfg.grid)
    extra_bits = cfg.selection_bits + choice_cost_bits(k_cand)
    info: dict[str, Any] = {"name": size.name, "config": asdict(mcfg), "parameters": n_params,
                            "cache_directory": mdir}
    cpu0 = time.process_time()
    wall0 = time.perf_counter()

    # 1. train one epoch on the first D tokens ------------------------------------------------
    done = os.path.join(mdir, "train.json")
    if os.path.exists(done) and os.path.exists(os.path.join(mdir, "model", "model.pt")):
        model = GPT.load(os.path.join(mdir, "model"))
        train_info = read_json(done)
        log(f"[{size.name}] N={n_params:,}: reusing the trained model in {mdir}")
    else:
        log(f"[{size.name}] N={n_params:,} ({size.n_layer} layer(s), d={size.d_model}, lr {lr:.2g}): one epoch "
            f"of {steps:,} steps x {cfg.batch_size * cfg.context_length} tokens = D = {d_tokens:,} tokens")
        torch.manual_seed(cfg.seed)
        model = GPT(mcfg)
        c0, w0 = time.process_time(), time.perf_counter()
        res = train(model, data.tokens, tcfg, checkpoint_path=os.path.join(mdir, "checkpoint.pt"),
                    progress=progress, meta={"key": json.dumps(model_key, sort_keys=True)}, log=log,
                    batch_fn=lambda step: sequential_batch(data.tokens, cfg.batch_size, cfg.context_length, step))
        model.save(os.path.join(mdir, "model"))
        # wall and CPU over the same span (train_seconds excludes the setup and checkpoints)
        train_info = {**res.to_dict(), "cpu_seconds": time.process_time() - c0,
                      "wall_seconds": time.perf_counter() - w0}
        atomic_write_json(done, train_info)
    tok_path = os.path.join(mdir, "model", "tokenizer.json")
    if not os.path.exists(tok_path):
        with atomic_path(tok_path) as tmp:
            shutil.copyfile(corpus.tokenizer_path, tmp)
    model.eval()
    if int(train_info["tokens_seen"]) != d_tokens:
        raise RuntimeError(f"[{size.name}] trained on {train_info['tokens_seen']} tokens, not D = {d_tokens}")
    info["training"] = {
        "steps": int(train_info["steps"]), "tokens": d_tokens, "tokens_per_parameter": d_tokens / n_params,
        "flops_6ND": training_flops(n_params, d_tokens), "seconds": train_info["train_seconds"],
        "cpu_seconds": train_info.get("cpu_seconds"), "lr": lr, "batch_size": cfg.batch_size,
        "epochs": 1, "final_loss_nats": train_info["losses_nats"][-1] if train_info["losses_nats"] else None,
        "rule": f"D = {cfg.tokens_per_parameter:g} N tokens, one epoch, each target once (its own first D tokens)",
    }

    # 2. quantize the grid, choose on the selection sample (paid: log2 K) ----------------------
    qkey = short_hash({"recipe": QUANT_RECIPE, "calibration": [cfg.calibration_sequences, cfg.calibration_seed],
                       "select": data.select.digest(), "rule": data.rule.to_dict()})
    qdir = os.path.join(mdir, "quant-" + qkey)
    os.makedirs(qdir, exist_ok=True)
    arch_bits = 8.0 * len(json.dumps(asdict(mcfg), sort_keys=True, separators=(",", ":")))
    calib = None
    cands = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=k_cand, desc=f"[{size.name}] quantize+select", unit="cand", dynamic_ncols=True)
    for i, choice in enumerate(cfg.grid):
        qseed = cfg.seed + 7919 * i
        qpath = os.path.join(qdir, f"{choice.label}-s{qseed}.pt")
        jpath = os.path.join(qdir, f"{choice.label}-s{qseed}.json")
        if os.path.exists(qpath) and os.path.exists(jpath):
            rec = read_json(jpath)
        else:
            if calib is None:
                calib = _calibration_tokens(data.tokens, cfg)
            tc, cc = time.perf_counter(), time.process_time()
            qm = _quantize_candidate(model, calib, choice, seed=qseed)
            qmodel = qm.dequantized_model(model)
            st = _score(qmodel, data.streams, data.units, data.rule, data.select, cfg, progress=False,
                        desc="select").stats
            model_bits = float(qm.coded_bits)
            rec = {"label": choice.label, **asdict(choice), "seed": qseed, "model_coded_bits": model_bits,
                   "coded_bits": model_bits + corpus.tokenizer_bits + arch_bits,
                   "bits_per_parameter": model_bits / n_params, "coded_bits_detail": qm.coded_bits_detail,
                   "select_nll_bits": st.mean_nll_bits, "select_stats": st.state_dict(),
                   "seconds": time.perf_counter() - tc, "cpu_seconds": time.process_time() - cc}
            with atomic_path(qpath) as tmp:
                torch.save(qm, tmp)
            atomic_write_json(jpath, rec)
        st = LossStats.from_state_dict(rec["select_stats"])
        rec["predicted_bound_bits"], rec["predicted_by"] = _predicted_bound(
            st, rec["coded_bits"], m, V, cfg.delta, extra_bits)
        cands.append(rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(cand=choice.label, bound=f"{rec['predicted_bound_bits']:.3f}")
    if bar is not None:
        bar.close()
    best = min(cands, key=lambda r: r["predicted_bound_bits"])
    log(f"[{size.name}] chose {best['label']} of {k_cand} (predicted {best['predicted_bound_bits']:.3f} bits; "
        f"{best['bits_per_parameter']:.2f} bits/parameter)")

    # 3. full passes over all m = D training tokens: quantized and unquantized ------------------
    edir = os.path.join(mdir, "eval-" + short_hash({"quant": qkey, "plan": data.full.digest()}))
    os.makedirs(edir, exist_ok=True)
    tag = f"{best['label']}-s{best['seed']}"
    paths = {"q": os.path.join(edir, f"state-{tag}.json"), "fp": os.path.join(edir, "state-unquantized.json")}
    times_path = os.path.join(edir, "eval-seconds.json")
    eval_seconds = read_json(times_path) if os.path.exists(times_path) else {}
    states: dict[str, Any] = {}
    for k in (*passes, *(p for p in PASSES if p not in passes)):
        if os.path.exists(paths[k]):
            states[k] = EvalState.from_state_dict(read_json(paths[k]))
            continue
        if k not in passes:
            log(f"[{size.name}] the {'quantized' if k == 'q' else 'unquantized'} full pass is not cached yet and "
                f"not among passes={passes}; leaving this size to the process that computes it")
            return None
        te, ce = time.perf_counter(), time.process_time()
        if k == "q":
            net = torch.load(os.path.join(qdir, f"{tag}.pt"), weights_only=False).dequantized_model(model)
        else:
            net = model
        desc = f"[{size.name}] full pass, {'quantized' if k == 'q' else 'unquantized'}"
        states[k] = _score(net, data.streams, data.units, data.rule, data.full, cfg, progress=progress, desc=desc)
        atomic_write_json(paths[k], states[k].state_dict())
        if os.path.exists(times_path):  # another process may have timed the other pass meanwhile (--passes)
            eval_seconds = {**read_json(times_path), **{x: v for x, v in eval_seconds.items() if x.startswith(k)}}
        eval_seconds[k] = time.perf_counter() - te
        eval_seconds[k + "_cpu"] = time.process_time() - ce
        atomic_write_json(times_path, eval_seconds)
    stats_q, fp = states["q"].stats, states["fp"].stats
    if stats_q.count != m or fp.count != m:
        raise RuntimeError(f"a full pass scored {stats_q.count} / {fp.count} tokens, not m = {m}")
    doc = stats_document(states["q"], data.rule, data.full, coded_bits=best["coded_bits"], delta=cfg.delta,
                         extra_bits=extra_bits,
                         description="scaling: coded model + tokenizer + architecture",
                         parts={"model": best["model_coded_bits"], "tokenizer": corpus.tokenizer_bits,
                                "architecture": arch_bits})
    stats_path = os.path.join(edir, f"stats-{tag}.json")
    atomic_write_json(stats_path, doc)
    fp_path = os.path.join(edir, "stats-unquantized.json")
    atomic_write_json(fp_path, stats_document(states["fp"], data.rule, data.full, coded_bits=best["coded_bits"],
                                              delta=cfg.delta, extra_bits=extra_bits,
                                              description="the unquantized model on the same tokens"))

    # 4. bounds -------------------------------------------------------------------------------
    table = from_stats(doc, best["coded_bits"], m, delta=cfg.delta, extra_bits=extra_bits, vocab_size=V,
                       full_pass=True, unquantized_stats=fp.state_dict())
    info.update({
        "tokens_m": m,
        "quantization": {
            "chosen": best["label"], "file": os.path.join(qdir, f"{tag}.pt"),
            "candidates": [{k: v for k, v in r.items() if k != "select_stats"} for r in cands],
            "num_candidates": k_cand, "choice_cost_bits": choice_cost_bits(k_cand),
            "selection_sample": {**data.select.to_dict(), "seed": cfg.select_seed},
            "model_coded_bits": best["model_coded_bits"], "bits_per_parameter": best["bits_per_parameter"],
            "gap_nll_bits": stats_q.mean_nll_bits - fp.mean_nll_bits,
        },
        "code_length": {"coded_bits": best["coded_bits"], "model_bits": best["model_coded_bits"],
                        "tokenizer_bits": corpus.tokenizer_bits, "architecture_bits": arch_bits,
                        "extra_bits": extra_bits,
                        "extra_bits_detail": {"selection_bits": cfg.selection_bits,
                                              "quantization_choice_bits": choice_cost_bits(k_cand)}},
        "losses": {"unquantized_nll_bits": fp.mean_nll_bits, "quantized_nll_bits": stats_q.mean_nll_bits},
        "bounds": table.to_dict(),
        "primary": table.primary,
        "decomposition": decompose(table),
        "stats_path": stats_path,
        "unquantized_stats_path": fp_path,
        "compute_seconds": {
            "train": float(train_info.get("wall_seconds", train_info["train_seconds"])),
            "train_cpu": float(train_info.get("cpu_seconds") or float("nan")),
            "quantize_select": float(sum(r.get("seconds", 0.0) for r in cands)),
            "quantize_select_cpu": float(sum(r.get("cpu_seconds", 0.0) for r in cands)),
            "evaluate": float(eval_seconds.get("q", 0.0) + eval_seconds.get("fp", 0.0)),
            "evaluate_cpu": float(eval_seconds.get("q_cpu", 0.0) + eval_seconds.get("fp_cpu", 0.0)),
        },
        "this_run_seconds": {"wall": time.perf_counter() - wall0, "cpu": time.process_time() - cpu0},
    })
    return info


def decompose(table) -> dict[str, float]:
    """Finzi et al.'s decomposition of the model's Freedman bound (spec/bounds.md section 6), all
    in bits per token: bound = unquantized loss + quantization gap + smoothing cost + complexity
    term + variance term (+ sampling, 0 after a full pass); ``sigma_bits`` = Delta sqrt(S), the
    loss deviation the variance term multiplies; ``parameters_per_token`` = log 1/P(h) / m in
    bits (C + the prefix-free code + extra bits, over m)."""
    f = table.bounds[table.primary["freedman"]]
    dec = dict(f.decomposition)
    out = {
        "bound_bits": float(f.bound_bits),
        "unquantized_bits": float(dec["unquantized_bits"]),
        "quantization_gap_bits": float(dec["quantization_gap_bits"]),
        "smoothing_cost_bits": float(dec["smoothing_cost_bits"]),
        "complexity_bits": float(f.complexity_bits),
        "variance_bits": float(f.variance_bits),
        "sampling_bits": float(f.sampling_bits),
        "sigma_bits": float(f.loss_range_bits * math.sqrt(f.scaled_variance)),
        "loss_range_bits": float(f.loss_range_bits),
        "alpha": float(f.alpha),
        "lambda": float(f.lam),
        "parameters_per_token_bits": float(f.log_prior_nats / math.log(2.0) / f.train_tokens),
        "empirical_bits": float(f.empirical_bits),
        "token_bound_bits": float(table.bounds[table.primary["token"]].bound_bits),
        "uniform_bits": float(f.uniform_bits),
    }
    total = (out["unquantized_bits"] + out["quantization_gap_bits"] + out["smoothing_cost_bits"]
             + out["complexity_bits"] + out["variance_bits"] + out["sampling_bits"])
    if not math.isclose(total, out["bound_bits"], rel_tol=1e-9, abs_tol=1e-9):
        raise RuntimeError(f"internal: the decomposition sums to {total!r}, not the bound {out['bound_bits']!r}")
    return out


def bound_command(record: dict[str, Any], stats_file: str, delta: float) -> list[str]:
    """The ``tokenbounds bound`` argument list that recomputes ``record``'s bounds from its files."""
    return ["bound", "--stats", stats_file, "--coded-bits", repr(record["code_length"]["coded_bits"]),
            "--train-tokens", str(record["tokens_m"]), "--extra-bits", repr(record["code_length"]["extra_bits"]),
            "--delta", repr(delta), "--full-pass", "--unquantized-stats", record["stats_unquantized_file"]]


def run_sweep(cfg: ScalingConfig, cache_dir: str, out_dir: str, *, progress: bool = True,
              only: tuple[str, ...] | None = None, passes: tuple[str, ...] = PASSES,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the corpus, then run every size (or those named in ``only``), smallest first, writing
    ``out_dir/models/<name>.json`` (+ ``stats/<name>.json``, ``stats/<name>-unquantized.json``) as
    each finishes; returns ``{"config", "corpus", "models": [...]}`` of the sizes that finished."""
    from .corpus import build_scaling_corpus

    if not cfg.sizes:
        raise ValueError("the sweep has no model sizes")
    if not cfg.grid:
        raise ValueError("the quantization grid is empty")
    if not passes or any(p not in PASSES for p in passes):
        raise ValueError(f"passes must name some of {PASSES}, got {passes}")
    names = [s.name for s in cfg.sizes]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be distinct, got {names}")
    sizes = cfg.sizes
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"--only names {unknown} are not sizes of the sweep {names}")
        sizes = tuple(s for s in cfg.sizes if s.name in only)
    t0 = time.perf_counter()
    corpus = build_scaling_corpus(cache_dir, cfg.sources, cfg.vocab_size, chunk_chars=cfg.chunk_chars,
                                  shuffle_seed=cfg.shuffle_seed, log=log)
    if corpus.n_tokens < cfg.min_corpus_tokens:
        raise ValueError(f"the corpus holds {corpus.n_tokens:,} tokens, fewer than min_corpus_tokens = "
                         f"{cfg.min_corpus_tokens:,}; add sources (scripts/get_corpus.sh --scaling)")
    log(f"corpus: {corpus.n_tokens:,} tokens, {corpus.n_documents:,} shuffled chunks, vocab {corpus.vocab_size}")
    os.makedirs(os.path.join(out_dir, "models"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "stats"), exist_ok=True)
    models = []
    for size in sizes:
        rec = run_model(size, cfg, corpus, cache_dir, progress=progress, passes=passes, log=log)
        if rec is None:
            continue
        for key, src, suffix in (("stats_file", "stats_path", ""),
                                 ("stats_unquantized_file", "unquantized_stats_path", "-unquantized")):
            dst = os.path.join(out_dir, "stats", f"{size.name}{suffix}.json")
            with atomic_path(dst) as tmp:
                shutil.copyfile(rec[src], tmp)
            rec[key] = dst
        rec["bound_command"] = bound_command(rec, rec["stats_file"], cfg.delta)
        atomic_write_json(os.path.join(out_dir, "models", f"{size.name}.json"), rec)
        d = rec["decomposition"]
        log(f"[{size.name}] N={rec['parameters']:,} D={rec['tokens_m']:,}: Freedman {d['bound_bits']:.4f} bits = "
            f"loss {d['unquantized_bits']:.4f} + quant {d['quantization_gap_bits']:+.4f} + smoothing "
            f"{d['smoothing_cost_bits']:.4f} + complexity {d['complexity_bits']:.4f} + variance "
            f"{d['variance_bits']:.4f} (Sigma {d['sigma_bits']:.3f}); {rec['this_run_seconds']['wall']:.0f} s")
        models.append(rec)
    return {"format": "tokenbounds.scaling-study/1", "config": cfg.to_dict(), "corpus": corpus.to_dict(),
            "models": models, "seconds": time.perf_counter() - t0}


def with_sizes(cfg: ScalingConfig, sizes: tuple[ModelSize, ...]) -> ScalingConfig:
    return replace(cfg, sizes=sizes)
