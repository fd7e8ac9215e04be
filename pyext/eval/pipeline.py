"""The scaling pipeline behind ``tokenbounds demo``: train -> quantize (best of a paid grid) ->
a full pass over the training tokens -> every bound, for several model sizes.

For each model size N (parameters, tied embedding counted once):

1. **Train** a :class:`~tokenbounds.models.gpt.GPT` on the corpus for a compute-optimal token
   budget ``D = tokens_per_parameter * N`` (Chinchilla's rule of thumb D ~ 20 N, Hoffmann et al.
   2022; training compute ``6 N D`` FLOPs). On 2 CPU cores that budget fits a few minutes only
   for N ~ 10^4 - 10^5, which is why the demo's models are that small. Step-budgeted training
   (no time limit), so it is bit-reproducible.
2. **Quantize** with :func:`tokenbounds.quant.quantize_model` (every linear weight; the token
   embedding through the tied LM head), then the position embedding
   (:func:`tokenbounds.quant.embedding.quantize_embeddings`, which also recodes the tied
   embedding / LM head with an identity Hessian) and float16 for the remaining
   LayerNorm / bias tensors (:func:`~tokenbounds.quant.embedding.compact_unquantized`), for each
   of K candidates of a grid (codebook x bits x LDLQ/RTN). Each candidate's dequantized model is
   scored on a *selection* sample of training tokens (its own seed) by the bound it would get;
   the best one is kept and the choice is **paid** for with ``log2 K`` extra bits in the prior
   (spec/bounds.md section 9: a union bound over the K candidates). The selection sample is a
   window-unit sample (``select_tokens`` draws, its own seed ``select_seed``, used nowhere else).
   **Compression candidates** (``compression``: spec strings of :mod:`tokenbounds.compress`, e.g.
   ``"subspace:d=2000"``, ``"sublora:rank=4,d=2000"``, ``"kron:rank=2"``; none by default) join
   the same grid: each spec's model is trained from its seeded init (a lora / sublora spec with
   ``base=LABEL``: on the dense model quantized with the grid's quantizer LABEL, its code counted)
   with the dense model's
   training config (the same steps x batch, so the same D training tokens and data order; the
   subspace learning-rate rule of :func:`tokenbounds.compress.subspace_lr` for subspace specs),
   coded (:func:`tokenbounds.compress.code_candidate`) with each quantizer choice of the grid
   (the rtn variants only for subspace coordinates, where LDLQ with no Hessian is RTN), decoded,
   and scored on the same selection sample. K counts every candidate, so ``log2 K`` pays for
   the compressions too, and the report shows which parametrization wins at each size.
3. **Evaluate** the dequantized model (the model the code describes) in a **full pass** over the
   corpus: every data point once, scored by the same engine as ``tokenbounds evaluate``
   (:class:`tokenbounds.eval.score.Scorer`: windows of T = ``context_length`` tokens scoring their
   last S = ``eval_stride`` targets, the fused head), so the empirical loss and the Freedman
   variance are exact and **there is no sampling term**; the unquantized model on exactly the
   same tokens (its own full pass) gives the paired quantization gap.
4. **Bounds** from the statistics with :func:`tokenbounds.bounds.from_stats` (``full_pass=True``):
   ``C = coded model bits + tokenizer merges + architecture config (8 bits per JSON character)``
   and ``extra_bits = selection_bits + log2 K``; ``selection_bits`` pays for this configuration's
   hyper-parameters, tuned while developing the demo on this corpus; the smoothing level is paid
   inside each bound (``alpha_cost="union"``) and the reported best of the 4 token/Freedman
   candidates is paid by running each at delta / 4.

Every step is cached under ``cache_dir`` (corpus, trained models, quantized candidates, statistics)
keyed by a hash of everything it depends on, so a rerun only reads files; ``fresh=True`` deletes
the cached models (and everything derived from them) and retrains.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from .fileio import atomic_path, atomic_write_json, read_json, short_hash

__all__ = [
    "DEMO_CONFIG",
    "TINY_CONFIG",
    "GridCandidate",
    "ModelSize",
    "PipelineConfig",
    "QuantChoice",
    "choice_cost_bits",
    "grid_candidates",
    "run_pipeline",
    "training_steps",
]


@dataclass(frozen=True)
class ModelSize:
    """Architecture of one GPT of the sweep (vocabulary and context come from the config)."""

    name: str
    n_layer: int
    n_head: int
    d_model: int


@dataclass(frozen=True)
class QuantChoice:
    """One candidate of the quantization grid."""

    codebook: str
    bits: int
    method: str
    incoherence: bool = True

    @property
    def label(self) -> str:
        return f"{self.codebook}{self.bits}-{self.method}" + ("" if self.incoherence else "-noinc")


@dataclass(frozen=True)
class GridCandidate:
    """One candidate of the paid grid: a parametrization coded with a quantizer choice.

    ``parametrization`` ``"dense"``: the trained GPT, post-training quantized with ``quant``;
    otherwise a :mod:`tokenbounds.compress` spec trained from scratch with the dense model's
    budget and coded with ``quant``'s codebook, bits, method and incoherence. ``index``: the
    position of ``quant`` in the config's grid (it seeds the Hadamard signs)."""

    quant: QuantChoice
    index: int
    parametrization: str = "dense"

    @property
    def dense(self) -> bool:
        return self.parametrization == "dense"

    @property
    def label(self) -> str:
        return self.quant.label if self.dense else f"{self.parametrization} @ {self.quant.label}"

    @property
    def spec_hash(self) -> str:
        """Hash of the parametrization and the recipe that trains it (cache names)."""
        return short_hash({"spec": self.parametrization, "recipe": COMPRESS_RECIPE}, 10)

    def seed(self, cfg: PipelineConfig) -> int:
        return cfg.seed + 7919 * self.index

    def file_stem(self, cfg: PipelineConfig) -> str:
        """Cache file name (a spec's characters are not all file-safe: it goes by its hash)."""
        head = self.quant.label if self.dense else f"c{self.spec_hash}-{self.quant.label}"
        return f"{head}-s{self.seed(cfg)}"


DEFAULT_GRID: tuple[QuantChoice, ...] = tuple(
    [QuantChoice("uniform", b, m) for b in (2, 3, 4, 8) for m in ("ldlq", "rtn")]
    + [QuantChoice("e8", 2, m) for m in ("ldlq", "rtn")]
)


@dataclass(frozen=True)
class PipelineConfig:
    """Everything the pipeline's results depend on (hashed into the cache keys).

    ``selection_bits`` pays for the hyper-parameters of this config (vocabulary, context, widths,
    learning rate, grid, evaluation stride, ...), which were chosen while developing the demo on
    this corpus: 10 bits = a choice among up to 1024 configurations. ``select_seed`` draws the
    quantizer-selection sample and is used for nothing else. Evaluation: full passes with windows
    of ``context_length`` tokens scoring their last ``eval_stride`` targets. ``compression``:
    :mod:`tokenbounds.compress` specs added to the paid grid (:func:`grid_candidates`; empty: the
    dense model only, the demo's default).
    """

    corpus: tuple[str, ...] = ("kjv", "shakespeare")
    vocab_size: int = 512
    context_length: int = 32
    sizes: tuple[ModelSize, ...] = (
        ModelSize("S", 1, 4, 24),
        ModelSize("M", 1, 4, 48),
        ModelSize("L", 2, 4, 64),
    )
    tokens_per_parameter: float = 20.0
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 1e-2
    seed: int = 0
    grid: tuple[QuantChoice, ...] = DEFAULT_GRID
    calibration_sequences: int = 128
    calibration_seed: int = 3
    select_tokens: int = 2000
    select_seed: int = 48271
    eval_stride: int = 32
    eval_batch_size: int = 512
    delta: float = 0.05
    selection_bits: float = 10.0
    compression: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid"] = [asdict(c) | {"label": c.label} for c in self.grid]
        return d


DEMO_CONFIG = PipelineConfig()
TINY_CONFIG = PipelineConfig(
    corpus=("tiny",), vocab_size=300, context_length=16,
    sizes=(ModelSize("S", 1, 2, 8), ModelSize("M", 1, 2, 16), ModelSize("L", 1, 2, 24)),
    tokens_per_parameter=0.5, max_steps=60, batch_size=8,
    grid=(QuantChoice("uniform", 2, "rtn"), QuantChoice("uniform", 4, "rtn"), QuantChoice("e8", 2, "rtn")),
    calibration_sequences=8, select_tokens=200, eval_stride=8, eval_batch_size=128,
)


# Bump when _quantize_candidate changes so cached candidates are not reused (changes inside
# tokenbounds.quant itself are not tracked: use --fresh after upgrading the quantizer).
QUANT_RECIPE = "quantize_model+embeddings(identity, tied recoded)+fp16/2"


# Bump when the compressed candidates' training or builders change (keys their cached models).
COMPRESS_RECIPE = "compress/1: build_model(seed) + train_candidate(dense TrainConfig)"


def compression_specs(cfg: PipelineConfig) -> list[str]:
    """The config's compression specs, parsed and in canonical form (ValueError on a bad one)."""
    from ..compress import parse_spec, pretrained_base

    specs = []
    for raw in cfg.compression:
        try:
            spec = str(parse_spec(raw))
        except ValueError as e:
            raise ValueError(f"--compression {raw!r}: {e}") from None
        if spec == "dense":
            raise ValueError("--compression 'dense': the dense model is always in the grid; name other specs")
        if spec in specs:
            raise ValueError(f"--compression {raw!r} is given twice")
        base = pretrained_base(spec)
        if base is not None and base not in [q.label for q in cfg.grid]:
            raise ValueError(f"--compression {raw!r}: base={base!r} names no quantizer of the grid; use init (the "
                             f"seeded init) or one of {', '.join(q.label for q in cfg.grid)} (the dense model "
                             "quantized with it)")
        specs.append(spec)
    return specs


def grid_candidates(cfg: PipelineConfig) -> list[GridCandidate]:
    """Every candidate of the paid grid, fixed by the config before any data is seen: the dense
    model with each quantizer of ``cfg.grid``, then each compression spec with each of them
    (subspace specs code z without a Hessian, where LDLQ is RTN: their rtn variants only, so no
    candidate is paid twice)."""
    from ..compress import parse_spec

    out = [GridCandidate(q, i) for i, q in enumerate(cfg.grid)]
    for spec in compression_specs(cfg):
        no_hessian = parse_spec(spec).subspace is not None
        seen: set[QuantChoice] = set()
        for i, q in enumerate(cfg.grid):
            if no_hessian:
                q = replace(q, method="rtn")
            if q not in seen:
                seen.add(q)
                out.append(GridCandidate(q, cfg.grid.index(q) if q in cfg.grid else i, spec))
    return out


def choice_cost_bits(num_candidates: int) -> float:
    """Prior bits that pay for keeping the best of ``num_candidates`` (union bound): log2 K."""
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    return math.log2(num_candidates)


def training_steps(num_parameters: int, cfg: PipelineConfig) -> int:
    """Steps of ``batch_size x context_length`` tokens that reach ``D = tokens_per_parameter * N``
    (capped by ``max_steps``)."""
    tokens = cfg.tokens_per_parameter * num_parameters
    steps = max(1, math.ceil(tokens / (cfg.batch_size * cfg.context_length)))
    return steps if cfg.max_steps is None else min(steps, cfg.max_steps)


def _predicted_bound(stats, coded_bits: float, m: int, vocab: int, delta: float, extra: float
                     ) -> tuple[float, str]:
    """The bound a candidate would get from a full pass, its empirical mean and variance taken
    from the selection sample: min(token-level, Freedman) (the selection criterion only; the
    reported bounds are recomputed from the full pass)."""
    from ..bounds import freedman_bound, token_bound

    emp = stats.mean_bits
    var = dict(zip(stats.alphas, [float(v) for v in stats.variance_bits], strict=True))
    common = dict(coded_bits=coded_bits, train_tokens=m, sample_tokens=None, vocab_size=vocab,
                  delta=delta, extra_bits=extra)
    tb = token_bound(emp, **common).bound_bits
    fb = freedman_bound(emp, variance_bits=var, **common).bound_bits
    return (tb, "token") if tb <= fb else (fb, "Freedman")


def _calibration_tokens(tokens, cfg: PipelineConfig):
    from .train import get_batch

    x, _ = get_batch(tokens, cfg.calibration_sequences, cfg.context_length, cfg.calibration_seed, 0)
    return x


def _quantize_candidate(model, calib, choice: QuantChoice, seed: int):
    from ..quant import quantize_model
    from ..quant.embedding import compact_unquantized, quantize_embeddings

    qm = quantize_model(model, calib, bits=choice.bits, method=choice.method, codebook=choice.codebook,
                        incoherence=choice.incoherence, seed=seed, progress=False)
    qm = quantize_embeddings(model, qm, bits=choice.bits, method=choice.method, codebook=choice.codebook,
                             incoherence=choice.incoherence, seed=seed)
    return compact_unquantized(qm)


def _score(net, streams, units, rule, plan, cfg: PipelineConfig, *, progress: bool, desc: str):
    """Score ``plan`` with ``net`` through the engine of ``tokenbounds evaluate``."""
    from .score import score_plan

    return score_plan(net, streams, units, rule, plan, batch_size=cfg.eval_batch_size, progress=progress, desc=desc)


def _model_config(size: ModelSize, cfg: PipelineConfig, vocab_size: int):
    from ..models.gpt import GPTConfig

    return GPTConfig(vocab_size=vocab_size, context_length=cfg.context_length, n_layer=size.n_layer,
                     n_head=size.n_head, d_model=size.d_model, dropout=0.0)


def _check_compression(specs: list[str], cfg: PipelineConfig, vocab_size: int) -> None:
    """Build every compression spec at every model size before anything is trained, so that a spec
    that does not fit one of them (rank above a layer's width, d above D, blocks that do not
    divide d_model, ...) fails at once with the size named."""
    from ..compress import build_model

    for size in cfg.sizes:
        mcfg = _model_config(size, cfg, vocab_size)
        for spec in specs:
            try:
                build_model(mcfg, spec, seed=cfg.seed)
            except ValueError as e:
                raise ValueError(f"--compression {spec!r} does not fit model {size.name} (d_model={size.d_model}, "
                                 f"{size.n_layer} layer(s), N={mcfg.num_parameters():,}): {e}") from None


def _pretrained_base(spec: str, model, tokens, cfg: PipelineConfig):
    """The code of a ``base=LABEL`` spec's pretrained base: the trained dense model quantized with
    the grid's quantizer LABEL, exactly as its dense grid candidate (same calibration and seed), or
    None for a spec on the seeded init."""
    from ..compress import pretrained_base

    label = pretrained_base(spec)
    if label is None:
        return None
    index = [q.label for q in cfg.grid].index(label)
    entry = GridCandidate(cfg.grid[index], index)
    return _quantize_candidate(model, _calibration_tokens(tokens, cfg), entry.quant, seed=entry.seed(cfg))


def _train_compressed(spec: str, mcfg, tcfg, tokens, mdir: str, cfg: PipelineConfig, dense_tokens: int, *,
                      name: str, progress: bool, log: Callable[[str], None], base_weights=None):
    """Train (or resume / reload from its checkpoint) one compression spec with the dense model's
    training config (on ``base_weights``, the code of a pretrained base, when the spec names
    one); returns (TrainedCandidate, training summary). Cached under ``mdir`` (keyed by corpus,
    model and training config) in a directory keyed by the spec, seed and recipes."""
    from ..compress import train_candidate

    key = {"spec": spec, "seed": cfg.seed, "recipe": COMPRESS_RECIPE}
    if base_weights is not None:
        key["base"] = {"recipe": QUANT_RECIPE, "calibration": [cfg.calibration_sequences, cfg.calibration_seed]}
    cdir = os.path.join(mdir, "compress-" + short_hash(key))
    os.makedirs(cdir, exist_ok=True)
    done = os.path.join(cdir, "train.json")
    start = "its seeded init" if base_weights is None else "the quantized dense model"
    if os.path.exists(done):
        log(f"[{name}] {spec}: reusing the trained candidate in {cdir}")
    else:
        log(f"[{name}] {spec}: training from {start}, {tcfg.steps} steps x "
            f"{tcfg.batch_size * mcfg.context_length} tokens (the dense model's budget)")
    trained = train_candidate(spec, mcfg, tokens, tcfg, seed=cfg.seed, checkpoint_path=os.path.join(cdir, "checkpoint.pt"),
                              progress=progress and not os.path.exists(done), log=log, base_weights=base_weights)
    res = trained.train_result
    if res.tokens_seen != dense_tokens:
        raise RuntimeError(f"{spec} saw {res.tokens_seen} training tokens, the dense model {dense_tokens}")
    summary = {"spec": spec, "steps": int(res.steps), "tokens": int(res.tokens_seen), "seconds": float(res.train_seconds),
               "lr": float(trained.train_config.lr), "trained_values": trained.num_trained,
               "final_loss_nats": res.losses_nats[-1] if res.losses_nats else None, "cache_directory": cdir}
    if not os.path.exists(done):
        atomic_write_json(done, summary)
    return trained, {"training": summary}


@dataclass
class _Coded:
    """A coded grid candidate: the message to cache, the decoded model to score, its bits."""

    message: Any
    model: Any
    model_bits: float
    architecture_bits: float
    detail: dict[str, float]
    mean_proxy_loss: float | None


def _code_candidate(entry: GridCandidate, model, trained, calib, seed: int, arch_bits: float) -> _Coded:
    """Code one grid candidate (the dense model's quantization, or a trained compression spec's
    code; dispatch here for new candidate kinds)."""
    if entry.dense:
        qm = _quantize_candidate(model, calib, entry.quant, seed=seed)
        return _Coded(qm, qm.dequantized_model(model), float(qm.coded_bits), arch_bits, qm.coded_bits_detail,
                      qm.summary()["mean_proxy_loss"])
    from ..compress import code_candidate

    q = entry.quant
    code = code_candidate(trained, calib, bits=q.bits, codebook=q.codebook, method=q.method,
                          incoherence=q.incoherence, quant_seed=seed)
    d = code.coded_bits_detail  # the header holds the architecture, the spec and the seeds
    proxy = code.weights.summary()["mean_proxy_loss"] if code.weights is not None else None
    return _Coded(code.encode(), code.model, code.coded_bits - d["header_bits"], d["header_bits"], d, proxy)


def _decoded_model(entry: GridCandidate, path: str, model):
    """The model a cached candidate's message decodes to (what the bound is on)."""
    import torch

    if entry.dense:
        return torch.load(path, weights_only=False).dequantized_model(model)
    from ..compress import CodedModel

    return CodedModel.decode(torch.load(path, weights_only=False)).build()


def _compression_summary(cands: list[dict[str, Any]], compression_info: dict[str, Any]) -> dict[str, Any]:
    """Per parametrization (dense first): its best candidate on the selection sample, and the
    winner of the whole grid."""
    out = []
    for p in ["dense", *compression_info]:
        mine = [c for c in cands if c["parametrization"] == p]
        b = min(mine, key=lambda c: c["predicted_bound_bits"])
        out.append({"parametrization": p, "best": b["label"], "predicted_bound_bits": b["predicted_bound_bits"],
                    "coded_bits": b["coded_bits"], "select_nll_bits": b["select_nll_bits"],
                    "candidates": len(mine), **compression_info.get(p, {})})
    winner = min(out, key=lambda r: r["predicted_bound_bits"])["parametrization"]
    return {"parametrizations": out, "winner": winner}


def _read_state(path: str):
    from .stats import EvalState

    return EvalState.from_state_dict(read_json(path))


def run_pipeline(
    cfg: PipelineConfig,
    cache_dir: str,
    *,
    fresh: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or load from the cache) the whole sweep; returns a JSON-able result dict with one
    entry per model under ``"models"`` (see the module docstring for the steps)."""
    import numpy as np
    import torch

    from ..bounds import from_stats, training_flops
    from ..losses import LossStats
    from ..models.gpt import GPT
    from .data import TokenStreams, build_corpus
    from .sample import ContextRule, Units, plan_units
    from .score import stats_document
    from .train import TrainConfig, train

    if not cfg.grid:
        raise ValueError("the quantization grid is empty")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    corpus = build_corpus(cache_dir, list(cfg.corpus), cfg.vocab_size, log=log)
    tokens = corpus.tokens()
    m = corpus.num_data_tokens
    V = corpus.vocab_size
    timings["corpus"] = time.perf_counter() - t0
    log(f"corpus: {corpus.n_documents} documents, {m:,} training tokens, vocab {V}")

    specs = compression_specs(cfg)
    entries = grid_candidates(cfg)
    k_cand = len(entries)
    extra_bits = cfg.selection_bits + choice_cost_bits(k_cand)
    if specs:
        _check_compression(specs, cfg, V)
    streams = TokenStreams([tokens], corpus.eot_id)
    rule = ContextRule("windows", cfg.context_length, cfg.eval_stride)
    units = Units(streams, rule.stride)
    full = plan_units(units, rule, sample_tokens=None, seed=0)
    select = plan_units(units, rule, sample_tokens=cfg.select_tokens, seed=cfg.select_seed)
    results = []
    for size in cfg.sizes:
        mcfg = _model_config(size, cfg, V)
        n_params = mcfg.num_parameters()
        steps = training_steps(n_params, cfg)
        tcfg = TrainConfig(steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                           warmup_steps=max(1, min(30, steps // 10)), max_seconds=None)
        model_key = {"corpus": corpus.tokens_sha256, "model": asdict(mcfg), "train": asdict(tcfg)}
        mdir = os.path.join(cache_dir, "pipeline", short_hash(model_key))
        if fresh and os.path.isdir(mdir):
            shutil.rmtree(mdir)
        os.makedirs(mdir, exist_ok=True)
        info: dict[str, Any] = {"name": size.name, "config": asdict(mcfg), "parameters": n_params,
                                "cache_directory": mdir}
        tm: dict[str, float] = {}

        # 1. train ---------------------------------------------------------------------------
        t = time.perf_counter()
        done = os.path.join(mdir, "train.json")
        if os.path.exists(done) and os.path.exists(os.path.join(mdir, "model", "model.pt")):
            model = GPT.load(os.path.join(mdir, "model"))
            train_info = read_json(done)
            log(f"[{size.name}] N={n_params:,}: reusing the trained model in {mdir} (--fresh retrains)")
        else:
            log(f"[{size.name}] N={n_params:,} ({size.n_layer} layer(s), d={size.d_model}): training "
                f"{steps} steps x {cfg.batch_size * cfg.context_length} tokens = "
                f"{steps * cfg.batch_size * cfg.context_length:,} tokens (~{cfg.tokens_per_parameter:g} N)")
            torch.manual_seed(cfg.seed)
            model = GPT(mcfg)
            res = train(model, tokens, tcfg, checkpoint_path=os.path.join(mdir, "checkpoint.pt"),
                        progress=progress, meta={"key": json.dumps(model_key, sort_keys=True)}, log=log)
            model.save(os.path.join(mdir, "model"))
            train_info = res.to_dict()
            atomic_write_json(done, train_info)
        # the tokenizer the model reads its corpus with: `tokenbounds evaluate --model DIR` counts it in C
        tok_path = os.path.join(mdir, "model", "tokenizer.json")
        if not os.path.exists(tok_path):
            with atomic_path(tok_path) as tmp:
                shutil.copyfile(corpus.tokenizer_path, tmp)
        model.eval()
        tm["train"] = time.perf_counter() - t
        d_tokens = int(train_info["tokens_seen"])
        info["training"] = {
            "steps": int(train_info["steps"]), "tokens": d_tokens,
            "tokens_per_parameter": d_tokens / n_params, "flops_6ND": training_flops(n_params, d_tokens),
            "seconds": train_info["train_seconds"], "lr": cfg.lr, "batch_size": cfg.batch_size,
            "final_loss_nats": train_info["losses_nats"][-1] if train_info["losses_nats"] else None,
            "rule": f"D = {cfg.tokens_per_parameter:g} N tokens"
                    + (" (Chinchilla rule of thumb D ~ 20 N)" if cfg.tokens_per_parameter == 20 else "")
                    + (f", capped at {cfg.max_steps} steps" if cfg.max_steps else ""),
        }

        # 1b. compressed candidates: the same training config from each spec's seeded init ----
        t = time.perf_counter()
        trained_c, compression_info = {}, {}
        for spec in specs:
            trained_c[spec], compression_info[spec] = _train_compressed(
                spec, mcfg, tcfg, tokens, mdir, cfg, d_tokens, name=size.name, progress=progress, log=log,
                base_weights=_pretrained_base(spec, model, tokens, cfg))
        if specs:
            tm["train_compressed"] = time.perf_counter() - t

        # 2. quantize the grid + choose on the selection sample --------------------------------
        t = time.perf_counter()
        # candidates depend on the calibration batch and are scored on the selection sample; the
        # choice itself is recomputed on every run (it depends on delta and the extra bits)
        qkey = short_hash({"recipe": QUANT_RECIPE, "calibration": [cfg.calibration_sequences, cfg.calibration_seed],
                           "select": select.digest(), "rule": rule.to_dict()})
        qdir = os.path.join(mdir, "quant-" + qkey)
        edir = os.path.join(mdir, "eval-" + short_hash({"quant": qkey, "rule": rule.to_dict(), "plan": full.digest()}))
        os.makedirs(qdir, exist_ok=True)
        os.makedirs(edir, exist_ok=True)
        arch_bits = 8.0 * len(json.dumps(asdict(mcfg), sort_keys=True, separators=(",", ":")))
        calib = None
        cands = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=k_cand, desc=f"[{size.name}] quantize+select", unit="cand", dynamic_ncols=True)
        for entry in entries:
            qseed = entry.seed(cfg)
            qpath = os.path.join(qdir, entry.file_stem(cfg) + ".pt")
            jpath = os.path.join(qdir, entry.file_stem(cfg) + ".json")
            if os.path.exists(qpath) and os.path.exists(jpath):
                rec = {"parametrization": "dense", "architecture_bits": arch_bits, **read_json(jpath)}
            else:
                if calib is None:
                    calib = _calibration_tokens(tokens, cfg)
                tc = time.perf_counter()
                coded = _code_candidate(entry, model, trained_c.get(entry.parametrization), calib, qseed, arch_bits)
                st = _score(coded.model, streams, units, rule, select, cfg, progress=False, desc="select").stats
                rec = {"label": entry.label, "parametrization": entry.parametrization, **asdict(entry.quant),
                       "seed": qseed, "model_coded_bits": coded.model_bits,
                       "architecture_bits": coded.architecture_bits,
                       "coded_bits": coded.model_bits + corpus.tokenizer_bits + coded.architecture_bits,
                       "bits_per_parameter": coded.model_bits / n_params,
                       "mean_proxy_loss": coded.mean_proxy_loss,
                       "coded_bits_detail": coded.detail,
                       "select_nll_bits": st.mean_nll_bits, "select_stats": st.state_dict(),
                       "seconds": time.perf_counter() - tc}
                with atomic_path(qpath) as tmp:
                    torch.save(coded.message, tmp)
                atomic_write_json(jpath, rec)
            st = LossStats.from_state_dict(rec["select_stats"])
            rec["predicted_bound_bits"], rec["predicted_by"] = _predicted_bound(
                st, rec["coded_bits"], m, V, cfg.delta, extra_bits)
            cands.append(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(cand=entry.label, bound=f"{rec['predicted_bound_bits']:.3f}")
        if bar is not None:
            bar.close()
        best = min(cands, key=lambda r: r["predicted_bound_bits"])
        tm["quantize_select"] = time.perf_counter() - t
        log(f"[{size.name}] chose {best['label']} among {k_cand} candidates "
            f"(predicted bound {best['predicted_bound_bits']:.3f} bits; pays log2 {k_cand} = "
            f"{choice_cost_bits(k_cand):.2f} bits)")

        # 3. full passes: the chosen decoded model, and its unquantized one on the same tokens
        t = time.perf_counter()
        chosen = next(e for e in entries if e.label == best["label"])
        tag = chosen.file_stem(cfg)
        fp_name = "unquantized" if chosen.dense else f"unquantized-c{chosen.spec_hash}"
        paths = {"q": os.path.join(edir, f"state-{tag}.json"), "fp": os.path.join(edir, f"state-{fp_name}.json")}
        times_path = os.path.join(edir, "eval-seconds.json")
        eval_seconds = read_json(times_path) if os.path.exists(times_path) else {}
        states: dict[str, Any] = {}
        for k in ("q", "fp"):
            if os.path.exists(paths[k]):
                states[k] = _read_state(paths[k])
                continue
            te = time.perf_counter()
            if k == "q":
                net = _decoded_model(chosen, os.path.join(qdir, f"{tag}.pt"), model)
            else:
                net = model if chosen.dense else trained_c[chosen.parametrization].unquantized_model()
            desc = f"[{size.name}] full pass, {'quantized' if k == 'q' else 'unquantized'}"
            states[k] = _score(net, streams, units, rule, full, cfg, progress=progress, desc=desc)
            atomic_write_json(paths[k], states[k].state_dict())
            eval_seconds[k] = time.perf_counter() - te
            atomic_write_json(times_path, eval_seconds)
        tm["evaluate"] = time.perf_counter() - t
        stats_q, fp = states["q"].stats, states["fp"].stats
        if stats_q.count != m or fp.count != m:
            raise RuntimeError(f"a full pass scored {stats_q.count} / {fp.count} tokens, not m = {m}")
        doc = stats_document(states["q"], rule, full, coded_bits=best["coded_bits"], delta=cfg.delta,
                             extra_bits=extra_bits, description="demo: coded model + tokenizer + architecture")
        stats_path = os.path.join(edir, f"stats-{tag}.json")
        atomic_write_json(stats_path, doc)

        # 4. bounds ----------------------------------------------------------------------------
        table = from_stats(doc, best["coded_bits"], m, delta=cfg.delta, extra_bits=extra_bits, vocab_size=V,
                           full_pass=True, train_documents=corpus.n_documents, num_parameters=n_params,
                           bits_per_parameter=32.0, unquantized_stats=fp.state_dict())
        alphas = list(stats_q.alphas)
        gap_by_alpha = {str(a): float(stats_q.mean[i] - fp.mean[i]) for i, a in enumerate(alphas)}
        info.update({
            "quantization": {
                "chosen": best["label"], "parametrization": best["parametrization"],
                "file": os.path.join(qdir, f"{tag}.pt"),
                "candidates": [{k: v for k, v in r.items() if k != "select_stats"} for r in cands],
                "num_candidates": k_cand, "choice_cost_bits": choice_cost_bits(k_cand),
                "selection_sample": {**select.to_dict(), "seed": cfg.select_seed},
                "model_coded_bits": best["model_coded_bits"],
                "bits_per_parameter": best["bits_per_parameter"],
                "coded_bits_detail": best["coded_bits_detail"],
                "gap_nll_bits": stats_q.mean_nll_bits - fp.mean_nll_bits,
                "gap_smoothed_bits": gap_by_alpha,
                "gap_note": f"quantized minus unquantized, paired: both models on all m = {m:,} tokens (full passes)",
            },
            "code_length": {"coded_bits": best["coded_bits"], "model_bits": best["model_coded_bits"],
                            "tokenizer_bits": corpus.tokenizer_bits, "architecture_bits": best["architecture_bits"],
                            "extra_bits": extra_bits,
                            "extra_bits_detail": {"selection_bits": cfg.selection_bits,
                                                  "quantization_choice_bits": choice_cost_bits(k_cand)}},
            "losses": {"unquantized_nll_bits": fp.mean_nll_bits, "quantized_nll_bits": stats_q.mean_nll_bits,
                       "quantized_smoothed_bits": {str(a): v for a, v in stats_q.mean_bits.items()},
                       "top1_error_quantized": stats_q.topk_error(1)},
            "bounds": table.to_dict(),
            "primary": table.primary,
            "rows": table.rows(),
            "stats_path": stats_path,
            "compression": _compression_summary(cands, compression_info) if specs else None,
            "seconds": tm,
            "compute_seconds": {
                "train": float(train_info["train_seconds"]),
                **({"train_compressed": float(sum(c["training"]["seconds"] for c in compression_info.values()))}
                   if specs else {}),
                "quantize_select": float(sum(r.get("seconds", 0.0) for r in cands)),
                "evaluate": float(sum(eval_seconds.values())),
            },
        })
        results.append(info)
        del model, trained_c
    timings["total"] = time.perf_counter() - t0
    return {
        "format": "tokenbounds.scaling/2",
        "config": cfg.to_dict(),
        "corpus": corpus.to_dict(),
        "train_tokens_m": m,
        "vocab_size": V,
        "uniform_baseline_bits": math.log2(V),
        "scoring": {**rule.to_dict(), "full_pass": True, "units": full.num_units, "scored_tokens": full.scored_tokens},
        "extra_bits": extra_bits,
        "models": results,
        "seconds": {**timings, "per_model": {r["name"]: r["seconds"] for r in results}},
        "numpy": np.__version__,
    }


# ----------------------------------------------------------------------------- reporting
MAIN_BOUNDS = (("token-level", "token"), ("Freedman", "freedman"))
"""(short name, key of ``BoundTable.primary``): the headline rows, whatever the sampling design."""


def _value(b: dict[str, Any]) -> float:
    return float(b["bound_bits"] if "bound_bits" in b else b["bound"])


def _vacuous(b: dict[str, Any]) -> bool:
    return bool(b["vacuous"])


def scale_summary(result: dict[str, Any]) -> list[str]:
    """Sentences: is each bound non-vacuous, and how it moves from the smallest to the largest model."""
    models = result["models"]
    uniform = result["uniform_baseline_bits"]
    lines = []
    for short, label in MAIN_BOUNDS:
        vals = [_bound_of(m, label) for m in models]
        verdicts = ", ".join(
            f"{m['name']} {_value(b):.3f} ({'VACUOUS' if _vacuous(b) else 'non-vacuous'})"
            for m, b in zip(models, vals, strict=True))
        lines.append(f"{short} bound vs uniform {uniform:.3f} bits: {verdicts}.")
        if len(models) >= 2:
            a, z = vals[0], vals[-1]
            emp_key, comp_key = "empirical_bits", "complexity_bits"
            d_emp = z[emp_key] - a[emp_key]
            d_comp = z[comp_key] - a[comp_key]
            d_tot = _value(z) - _value(a)
            trend = "falls" if d_tot < 0 else "rises"
            lines.append(
                f"  from {models[0]['name']} (N={models[0]['parameters']:,}) to {models[-1]['name']} "
                f"(N={models[-1]['parameters']:,}) it {trend} by {abs(d_tot):.3f} bits: empirical loss "
                f"{d_emp:+.3f}, complexity {d_comp:+.3f}, sampling "
                f"{z['sampling_bits'] - a['sampling_bits']:+.3f}"
                + (f", variance-gap {z['gap_bits'] - a['gap_bits']:+.3f} (incl. complexity)" if "gap_bits" in z else "")
                + ".")
    return lines


def _bound_of(model: dict[str, Any], which: str) -> dict[str, Any]:
    """The model's headline bound ``which`` ("token" or "freedman", see :data:`MAIN_BOUNDS`)."""
    return model["bounds"]["bounds"][model["primary"][which]]


def format_markdown(result: dict[str, Any]) -> str:
    """The report: one summary table (a row per model), every bound per model, the accounting."""
    models = result["models"]
    uniform = result["uniform_baseline_bits"]
    cfg = result["config"]
    out = ["# tokenbounds demo: bounds vs model size", ""]
    out.append(
        f"Corpus {'+'.join(cfg['corpus'])}: m = {result['train_tokens_m']:,} training tokens, byte-level BPE "
        f"V = {result['vocab_size']} (uniform predictor: log2 V = {uniform:.3f} bits/token). "
        f"Each bound evaluates **all m training tokens** (a full pass: windows of "
        f"{result['scoring']['window']} tokens scoring their last {result['scoring']['stride']}), so there is "
        f"no sampling term; delta = {cfg['delta']}.")
    out.append("")
    head = ("| model | N params | D tokens (D/N) | quantizer (of K) | bits/param | C bits | quant gap bits | "
            "loss fp | loss q | token-level | Freedman | best (paid) | non-vacuous |")
    out += [head, "|" + "---|" * (head.count("|") - 1)]
    for m in models:
        t = _bound_of(m, MAIN_BOUNDS[0][1])
        f = _bound_of(m, MAIN_BOUNDS[1][1])
        q = m["quantization"]
        nv = [name for name, lb in MAIN_BOUNDS if not _vacuous(_bound_of(m, lb))]
        out.append(
            f"| {m['name']} | {m['parameters']:,} | {m['training']['tokens']:,} "
            f"({m['training']['tokens_per_parameter']:.1f}) | {q['chosen']} ({q['num_candidates']}) | "
            f"{q['bits_per_parameter']:.2f} | {m['code_length']['coded_bits']:,.0f} | "
            f"{q['gap_nll_bits']:+.4f} | {m['losses']['unquantized_nll_bits']:.3f} | "
            f"{m['losses']['quantized_nll_bits']:.3f} | {_value(t):.3f} | {_value(f):.3f} | "
            f"{m['bounds']['best']['bound_bits']:.3f} | {', '.join(nv) if nv else 'none'} |")
    out.append("")
    out.append("loss fp / loss q: unsmoothed bits/token of the unquantized and the quantized model over all m "
               "tokens; quant gap = their paired difference (the same tokens). bits/param: the model's coded "
               "size (codes + scales + headers + fp16 norms/biases) / N. C also counts the tokenizer and "
               "the architecture."
               + (" With compression candidates, the chosen candidate may be a compressed parametrization "
                  "(its spec before the quantizer); loss fp is then that parametrization before coding."
                  if cfg.get("compression") else ""))
    out.append("")
    out.append("## How the bounds move with scale")
    out.append("")
    out += [f"* {ln.strip()}" for ln in scale_summary(result)]
    out.append("")
    out.append("## Every bound (bits per token; `tokenbounds.bounds.from_stats`)")
    out.append("")
    labels = list(models[0]["bounds"]["bounds"])
    out.append("| bound | " + " | ".join(f"{m['name']} value (emp + compl + samp) | vac." for m in models) + " |")
    out.append("|---|" + "---|---|" * len(models))
    for lb in labels:
        cells = []
        for m in models:
            r = next(r for r in m["rows"] if r["bound"] == lb)
            cells.append(f"{r['value']:.4f} ({r['empirical']:.3f} + {r['complexity']:.3f} + {r['sampling']:.3f}) "
                         f"| {'yes' if r['vacuous'] else 'no'}")
        out.append(f"| {lb} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("Freedman rows: the complexity column is the whole gap (complexity + variance term). "
               "Top-k rows are error rates (uniform baseline 1 - 1/V); the mutual-information bound holds "
               "in expectation only; document-level and parameter-count bounds (32 bits per parameter, "
               "m = documents) are the classic baselines, illustrative.")
    out.append("")
    out.append("## Honest accounting")
    out.append("")
    ex = models[0]["code_length"]["extra_bits_detail"]
    out += [
        "* The bound is on the model the code describes: the *dequantized* weights (evaluated with the "
        "fused `linear_smoothed_nll` head) + the tokenizer.",
        "* C = entropy-coded quantized model (range-coded codes, float16 scales, per-layer headers and "
        "Hadamard seeds, float16 LayerNorm/bias tensors) + tokenizer merges + architecture config "
        "(8 bits per JSON character); the prefix-free fix C + 2 log2 C is applied by the bounds.",
        f"* extra bits = {ex['selection_bits']:g} (`selection_bits`: the demo's hyper-parameters were tuned on "
        "this corpus — vocabulary, context, widths, learning rate, grid, evaluation stride; up to 1024 "
        f"configurations) + {ex['quantization_choice_bits']:.3f} (log2 K: best of K = "
        f"{models[0]['quantization']['num_candidates']} "
        + ("candidates (parametrizations x quantizers)" if cfg.get("compression") else "quantizers")
        + ", chosen on a window-unit sample of "
        f"{cfg['select_tokens']:,} draws with its own seed {cfg['select_seed']}, used for nothing else).",
        "* Full passes: every training token is evaluated, so the empirical loss and the Freedman variance "
        "are exact and there is **no sampling term left to pay** (the sampling columns are 0); the "
        "quantization gap is paired (both models on the same m tokens).",
        "* Smoothing level: union over the 8-level grid inside each bound (`alpha_cost='union'`). "
        f"\"best (paid)\": minimum of {len(models[0]['bounds']['best']['among'])} token/Freedman variants, each "
        f"run at delta / {len(models[0]['bounds']['best']['among'])}.",
        "* Each model's bound holds at its own delta; a minimum over the models would need delta / "
        f"{len(models)}.",
        f"* Training budget: {models[0]['training']['rule']}; training compute 6 N D FLOPs. Only models of "
        "10^4 - 10^5 parameters reach D = 20 N in a few minutes on 2 CPU cores.",
    ]
    if cfg.get("compression"):
        out.append(
            f"* Compression candidates ({', '.join(f'`{c}`' for c in cfg['compression'])}): each trained from its "
            "seeded init (the frozen base of lora / sublora is that init, costing its seed; with base=LABEL it is "
            "the dense model quantized with LABEL, whose whole code is counted in C, after the dense model's own "
            "training, so twice its compute) with the dense model's "
            "training config, i.e. the same D training tokens in the same order, then coded with each quantizer of "
            "the grid; they are among the K candidates, so log2 K pays for them. The list of specs is fixed on the "
            "command line before the run; a list chosen after seeing earlier runs' results on this corpus is a "
            "further choice these bounds do not pay (add its log2 to the extra bits).")
    out.append("")
    out.append("## Quantization candidates (selection sample, bound predicted for a full pass)")
    out.append("")

    def dense_cands(m):
        return [c for c in m["quantization"]["candidates"] if c.get("parametrization", "dense") == "dense"]

    out.append("| model | " + " | ".join(c["label"] for c in dense_cands(models[0])) + " |")
    out.append("|---|" + "---|" * len(dense_cands(models[0])))
    for m in models:
        cells = [f"{c['predicted_bound_bits']:.3f} ({c['bits_per_parameter']:.2f} b/p)"
                 + (" **chosen**" if c["label"] == m["quantization"]["chosen"] else "")
                 for c in dense_cands(m)]
        out.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("Cells: the bound predicted from the selection sample (the choice criterion) and the model's "
               "coded bits per parameter.")
    if cfg.get("compression"):
        out += ["", "## Compression candidates: which parametrization wins at each size", ""]
        params = [r["parametrization"] for r in models[0]["compression"]["parametrizations"]]
        out.append("| model | " + " | ".join(("dense (PTQ)" if p == "dense" else f"`{p}`") for p in params) + " |")
        out.append("|---|" + "---|" * len(params))
        for m in models:
            comp = m["compression"]
            cells = [f"{r['predicted_bound_bits']:.3f} ({r['best'].rpartition(' @ ')[2]}, C {r['coded_bits']:,.0f}, "
                     f"trained {r.get('training', {}).get('trained_values', m['parameters']):,})"
                     + (" **wins**" if r["parametrization"] == comp["winner"] else "")
                     for r in comp["parametrizations"]]
            out.append(f"| {m['name']} | " + " | ".join(cells) + " |")
        out.append("")
        out.append("Cells: the best bound predicted from the selection sample over that parametrization's "
                   "quantizers (which one, its C bits, its number of trained values); every row was trained "
                   "on the same D tokens. **wins**: the parametrization of the candidate the grid keeps.")
    secs = result["seconds"]
    out.append("")
    out.append("Compute time of each step when it ran (cached steps are not rerun): " + "; ".join(
        f"{m['name']}: " + ", ".join(f"{k} {v:.1f} s" for k, v in m["compute_seconds"].items()) for m in models)
        + f"; corpus build {result['corpus']['build_seconds']:.1f} s.")
    out.append("")
    out.append(f"This run: corpus {secs['corpus']:.1f} s; " + "; ".join(
        f"{name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in tm.items()) for name, tm in secs["per_model"].items())
        + f"; total {secs['total']:.1f} s.")
    return "\n".join(out) + "\n"
