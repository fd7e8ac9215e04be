"""``tokenbounds length``: loss and bound per position bucket, from 1 to L, inside and beyond the
training context T.

**Scoring.** Through the window engine (:class:`tokenbounds.eval.score.Scorer`) with the window
rule of ``tokenbounds.eval.sample`` at window = stride = L: unit u of a file scores the targets
k in (uL, (u+1)L] from the tokens x[uL : k], so the target at place p of a window (p = 1..L) is
predicted from exactly p data tokens (its *position*, the context length). A full pass: every
target of the data scored once. A file of n tokens gives each position about (n - 1) / L
targets (the last, partial window of a file reads the L tokens before its last target, so its
targets sit at the largest positions: :func:`position_populations`).

**Buckets.** :func:`~tokenbounds.length.buckets.bucket_edges` (geometric, T + 1 always an edge, so
no bucket mixes seen and unseen lengths). With a prefix token the model reads p + 1 tokens for
position p, so the training context covers positions 1..T - 1 and the edge is at T. Bucket b's
population m_b, the number of targets of the full pass whose position falls in it, is fixed by
the file lengths alone (:func:`position_populations`) and checked against what was scored; the
populations sum to m.

**Bounds.** For bucket b the risk R_b = (1/m_b) sum_{k in b} E[l(X_k) | x_<k] is a martingale
average over positions chosen before seeing any loss, so the full-pass token-level and Freedman
bounds (``tokenbounds.bounds.from_stats`` with ``full_pass=True``, m = m_b; spec/bounds.md
sections 1-2) apply to it with the same prior (the model's code length C, as ``tokenbounds
evaluate`` computes it). All B buckets are reported, so the union over them is paid: each bucket's
bound is at delta / B and all B hold together with probability >= 1 - delta. Within a bucket the
reported bound is ``from_stats``' best (the minimum over its K candidates, each at delta / (B K)).

**Resume.** The plan is cut into blocks of ``checkpoint_every`` batches, each saved once in
``OUT/checkpoint/`` (:class:`tokenbounds.eval.checkpoint.BlockStore`); an interrupted run resumes
at the first missing block and gives the same numbers.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..losses import DEFAULT_ALPHAS, LN2, LossStats, TokenLosses
from .buckets import PositionBuckets, bucket_edges

__all__ = ["FORMAT", "BucketedState", "LengthOptions", "bucket_bounds", "measure_length", "plot_length",
           "position_populations"]

FORMAT = "tokenbounds.length/1"


def position_populations(file_sizes: Sequence[int] | np.ndarray, max_length: int) -> np.ndarray:
    """[L] int64: how many targets of a full pass at window = stride = L have position p = 1..L
    (row p - 1), for files of the given token counts, by the window rule of
    ``tokenbounds.eval.sample``: unit u scores the targets k in (uL, min((u+1)L, n-1)] reading
    x[max(0, l - L) : k] (l its last target). A full window gives one target to every position;
    the last, partial one (r = (n - 1) mod L targets) reads the L tokens before its last target,
    so its targets have positions L - r + 1..L, or 1..r when the file has no full window."""
    L = int(max_length)
    out = np.zeros(L, dtype=np.int64)
    for n in np.asarray(file_sizes, dtype=np.int64).tolist():
        full, rest = divmod(max(int(n) - 1, 0), L)
        out += full
        if rest:
            out[L - rest:] += 1 if full else 0
            out[:rest] += 0 if full else 1
    return out


def _take(losses: TokenLosses, idx: np.ndarray) -> TokenLosses:
    return TokenLosses(losses.nll_bits[idx], losses.logp[idx], losses.rank[idx], losses.valid[idx],
                       losses.alphas, losses.vocab_size)


@dataclass
class BucketedState:
    """Mergeable statistics of a full pass by position: a :class:`tokenbounds.LossStats` per
    bucket (what the bounds need), and per position p = 1..L the count and the float64 sums of
    the unsmoothed loss and of each smoothed loss (the loss-by-position curve).

    Has the ``update`` signature of :class:`tokenbounds.eval.stats.EvalState`, so
    :meth:`tokenbounds.eval.score.Scorer.score` / ``Scorer.batch`` accumulate into it."""

    edges: np.ndarray
    buckets: list[LossStats]
    pos_count: np.ndarray  # [L] int64
    pos_nll_sum_bits: np.ndarray  # [L] unsmoothed -log2 p_y
    pos_sum_bits: np.ndarray  # [L, A] smoothed losses
    pos_sumsq_bits: np.ndarray  # [L, A]

    @classmethod
    def empty(cls, edges: np.ndarray, alphas: Sequence[float], vocab_size: int) -> BucketedState:
        edges = np.asarray(edges, dtype=np.int64)
        L, a = int(edges[-1]) - 1, len(alphas)
        return cls(edges, [LossStats(alphas=tuple(alphas), vocab_size=vocab_size) for _ in range(len(edges) - 1)],
                   np.zeros(L, np.int64), np.zeros(L), np.zeros((L, a)), np.zeros((L, a)))

    @property
    def max_length(self) -> int:
        return int(self.edges[-1]) - 1

    def update(self, losses: TokenLosses, context_lengths: np.ndarray, unit_index: np.ndarray,
               unit_weights: np.ndarray) -> BucketedState:
        """Add a batch (numpy losses; ``context_lengths`` are the positions 1..L). A full pass
        scores each unit once, so every weight must be 1."""
        if np.any(np.asarray(unit_weights) != 1):
            raise ValueError("position buckets hold a full pass: every unit is scored once (weights 1)")
        pos = np.asarray(context_lengths, dtype=np.int64)
        if pos.size and (pos.min() < 1 or pos.max() > self.max_length):
            raise ValueError(f"position {int(pos.max())} outside 1..{self.max_length}: the window is longer "
                             "than the buckets' max_length")
        if not np.asarray(losses.valid, dtype=bool).all():
            raise ValueError("a scored target is marked invalid; position buckets need every target of the pass")
        b = np.searchsorted(self.edges, pos, side="right") - 1
        order = np.argsort(b, kind="stable")
        bounds = np.searchsorted(b[order], np.arange(len(self.buckets) + 1))
        for j in range(len(self.buckets)):
            if bounds[j + 1] > bounds[j]:
                self.buckets[j].update(_take(losses, order[bounds[j]:bounds[j + 1]]))
        idx, L = pos - 1, self.max_length
        nll = np.asarray(losses.nll_bits, dtype=np.float64)
        self.pos_count += np.bincount(idx, minlength=L)
        self.pos_nll_sum_bits += np.bincount(idx, weights=-np.asarray(losses.logp, dtype=np.float64) / LN2, minlength=L)
        for a in range(nll.shape[1]):
            self.pos_sum_bits[:, a] += np.bincount(idx, weights=nll[:, a], minlength=L)
            self.pos_sumsq_bits[:, a] += np.bincount(idx, weights=nll[:, a] ** 2, minlength=L)
        return self

    def merge(self, other: BucketedState) -> BucketedState:
        """In place: self followed by other."""
        if not np.array_equal(self.edges, other.edges):
            raise ValueError("cannot merge position statistics with different buckets")
        for mine, theirs in zip(self.buckets, other.buckets, strict=True):
            mine.merge(theirs, inplace=True)
        self.pos_count += other.pos_count
        self.pos_nll_sum_bits += other.pos_nll_sum_bits
        self.pos_sum_bits += other.pos_sum_bits
        self.pos_sumsq_bits += other.pos_sumsq_bits
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"edges": self.edges.tolist(), "buckets": [s.state_dict() for s in self.buckets],
                "pos_count": self.pos_count.tolist(), "pos_nll_sum_bits": self.pos_nll_sum_bits.tolist(),
                "pos_sum_bits": self.pos_sum_bits.tolist(), "pos_sumsq_bits": self.pos_sumsq_bits.tolist()}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> BucketedState:
        buckets = [LossStats.from_state_dict(s) for s in d["buckets"]]
        a = len(buckets[0].alphas)
        return cls(np.asarray(d["edges"], dtype=np.int64), buckets, np.asarray(d["pos_count"], dtype=np.int64),
                   np.asarray(d["pos_nll_sum_bits"], dtype=np.float64),
                   np.asarray(d["pos_sum_bits"], dtype=np.float64).reshape(-1, a),
                   np.asarray(d["pos_sumsq_bits"], dtype=np.float64).reshape(-1, a))

    def position_buckets(self, context_length: int | None) -> PositionBuckets:
        """The per-bucket populations and smoothed-loss sums (``counts.sum() == m``)."""
        starts = self.edges[:-1] - 1
        return PositionBuckets(self.edges, np.add.reduceat(self.pos_count, starts),
                               np.add.reduceat(self.pos_sum_bits, starts, axis=0),
                               np.add.reduceat(self.pos_sumsq_bits, starts, axis=0), context_length)


def bucket_bounds(state: BucketedState, coded_bits: float, *, delta: float = 0.05, extra_bits: float = 0.0,
                  vocab_size: int) -> list[dict[str, Any]]:
    """One record per bucket: its population m_b, losses and full-pass bounds at delta / B (the
    union over the B buckets is paid). The record's ``bound_bits`` is ``from_stats``' best; the
    token-level and Freedman rows it was chosen from are given too."""
    from ..bounds import from_stats

    if not 0 < delta < 1:
        raise ValueError(f"--delta must lie in (0, 1), got {delta}")
    B = len(state.buckets)
    delta_b = delta / B
    out = []
    for j, st in enumerate(state.buckets):
        lo, hi = int(state.edges[j]), int(state.edges[j + 1]) - 1
        rec: dict[str, Any] = {"positions": [lo, hi], "m": int(st.count), "delta": delta_b}
        if st.count == 0:
            out.append({**rec, "bound_bits": None, "note": "no target at these positions"})
            continue
        table = from_stats(st, coded_bits, st.count, delta=delta_b, extra_bits=extra_bits, vocab_size=vocab_size,
                           full_pass=True)
        prim = table.primary
        tok, fre = table.bounds[prim["token"]], table.bounds[prim["freedman"]]
        rec.update({
            "mean_nll_bits": float(st.mean_nll_bits), "best_alpha": table.best.get("alpha"),
            "bound_bits": float(table.best["bound_bits"]), "bound_label": table.best["label"],
            "valid": bool(table.best["valid"]),
            "candidates": len(table.best["among"]),
            "vacuous": bool(table.best["result"].vacuous),
            "token_bound_bits": float(tok.bound_bits), "freedman_bound_bits": float(fre.bound_bits),
            "empirical_bits": float(tok.empirical_bits), "token_alpha": tok.alpha,
        })
        out.append(rec)
    return out


@dataclass
class LengthOptions:
    """The options of ``tokenbounds length`` (see its ``--help``)."""

    model: str
    data: list[str]
    max_length: int
    out: str
    buckets: int = 16
    delta: float = 0.05
    prefix_token: str = "auto"
    batch_size: int | None = None
    checkpoint_every: int = 8
    eot_id: int | None = None
    token_dtype: str = "uint16"
    text_field: str = "text"
    tokenizer: str | None = None
    gguf_file: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    bits: int | None = None
    coded_bits: float | None = None
    bits_per_param: float | None = None
    tokenizer_bits: float | None = None
    extra_bits: float = 0.0
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    threads: int | None = None
    restart: bool = False
    progress: bool = True
    plots: bool = True


def _check(opts: LengthOptions) -> None:
    L = opts.max_length
    if isinstance(L, bool) or int(L) != L or L < 1:
        raise ValueError(f"--max-length must be an integer >= 1 (the longest context scored), got {L!r}")
    if int(opts.buckets) < 1:
        raise ValueError(f"--buckets must be >= 1, got {opts.buckets}")
    if not 0 < opts.delta < 1:
        raise ValueError(f"--delta must lie in (0, 1), got {opts.delta}")
    if not opts.data:
        raise ValueError("--data: no files given")
    for path in opts.data:
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise ValueError(f"--data {path} is empty: there are no tokens to score")
    if opts.checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be >= 1, got {opts.checkpoint_every}")
    if sum(x is not None for x in (opts.bits, opts.coded_bits, opts.bits_per_param)) > 1:
        raise ValueError("give at most one of --bits, --coded-bits, --bits-per-param")


def _longest_input(lm) -> tuple[int | None, str]:
    """(the longest input the model accepts or None for any, what limits it)."""
    if lm.kind == "tokenbounds-gpt":
        limit = lm.model.max_length
        enc = lm.model.config.position_encoding
        return limit, (f"this GPT has learned absolute position embeddings (position_encoding='{enc}'), which exist "
                       f"only for the {lm.context_length} positions it was trained on")
    return lm.context_length, (f"this Hugging Face model ({lm.kind}) declares {lm.context_length} positions "
                               "(n_positions / max_position_embeddings)")


def _eval_options(opts: LengthOptions):
    """The same settings as ``tokenbounds evaluate`` options (a full pass at window = stride = L),
    so loading, data preparation, the context rule and C go through its helpers."""
    from ..eval.evaluate import EvalOptions

    return EvalOptions(model=opts.model, data=list(opts.data), out=opts.out, window=int(opts.max_length),
                       stride=int(opts.max_length), full_pass=True, prefix_token=str(opts.prefix_token),
                       batch_size=opts.batch_size, checkpoint_every=opts.checkpoint_every, eot_id=opts.eot_id,
                       token_dtype=opts.token_dtype, text_field=opts.text_field, dtype=opts.dtype, device=opts.device,
                       alphas=tuple(opts.alphas), bits=opts.bits, coded_bits=opts.coded_bits,
                       bits_per_param=opts.bits_per_param, tokenizer_bits=opts.tokenizer_bits,
                       extra_bits=opts.extra_bits, delta=opts.delta, gguf_file=opts.gguf_file,
                       tokenizer=opts.tokenizer, restart=opts.restart, progress=opts.progress, threads=opts.threads,
                       plots=opts.plots)


def measure_length(opts: LengthOptions, *, log=print) -> dict[str, Any]:
    """Run (or resume) ``tokenbounds length``: write ``OUT/length.json`` and ``OUT/length.png``;
    returns the JSON document."""
    import torch

    from ..eval import evaluate as E
    from ..eval.checkpoint import BlockStore, config_hash
    from ..eval.distributed import World
    from ..eval.fileio import atomic_write_text
    from ..eval.hf import FusedHead
    from ..eval.runtime import choose_threads
    from ..eval.sample import Units, plan_units
    from ..eval.score import Scorer, batch_slices

    _check(opts)
    t_start = time.perf_counter()
    L = int(opts.max_length)
    eopts = _eval_options(opts)
    os.makedirs(opts.out, exist_ok=True)
    threads = choose_threads(opts.threads)
    torch.set_num_threads(threads)
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available")
    device = torch.device("cuda" if opts.device != "cpu" and torch.cuda.is_available() else "cpu")
    lm, tbq = E._load_model(eopts)  # on the CPU; --quantized decoded into it
    head = FusedHead(lm.model)
    vocab = head.vocab_size
    train_context = lm.context_length
    limit, why = _longest_input(lm)
    pfx = 0 if opts.prefix_token == "none" else (int(lm.bos_id is not None) if opts.prefix_token == "auto" else 1)
    if limit is not None and L + pfx > limit:
        extra = " plus the prefix token" if pfx else ""
        raise ValueError(
            f"--max-length {L}{extra} needs inputs of {L + pfx} tokens, but {why}: it cannot be evaluated beyond "
            f"{limit} tokens. Use --max-length {limit - pfx} or less"
            + (" (or --prefix-token none)" if pfx else "")
            + (", or train with position_encoding='rope', 'alibi' or 'none' to measure extrapolation"
               if lm.kind == "tokenbounds-gpt" else ""))
    files, streams, eot_id = E._load_data(eopts, lm, vocab, World())
    if eopts.bits is not None:  # --bits: the tbq quantizer on the data's calibration windows, as evaluate does
        tbq = E._quantize_here(eopts, lm, files, World(), threads)
    lm.model.to(device).eval()
    head = FusedHead(lm.model)  # again: the weights it reads are the (possibly quantized) ones on the device
    longest = int(streams.sizes.max())
    if longest < L + 1:
        raise ValueError(f"the data is shorter than the longest position: the longest file holds {longest} tokens, "
                         f"so no target has {L} tokens before it; use --max-length {longest - 1} or less, or "
                         "longer files")
    lm.context_length = limit  # the rule's model-context check: the longest input, not the training length
    rule, prefix_source = E._context_rule(eopts, lm, streams, eot_id, vocab)
    units = Units(streams, rule.stride)
    plan = plan_units(units, rule, sample_tokens=None, seed=0)
    coded = E._coded_size(eopts, lm, tbq)
    trained_positions = None if train_context is None else int(train_context) - pfx
    edges = bucket_edges(L, trained_positions if trained_positions and trained_positions >= 1 else None,
                         int(opts.buckets))
    expected = position_populations(streams.sizes, L)
    batch_size = E._batch_size(eopts, rule)
    config = {"format": FORMAT, "model": {"path": os.path.abspath(opts.model), "kind": lm.kind,
                                          "fingerprint": lm.quantization["fingerprint"]["sha256"], "dtype": opts.dtype,
                                          "quantize_bits": opts.bits},
              "data": [{"path": f.info["path"], "sha256": f.info["sha256"], "n_tokens": f.info["n_tokens"]}
                       for f in files],
              "rule": rule.to_dict(), "edges": edges.tolist(), "batch_size": batch_size,
              "checkpoint_every": opts.checkpoint_every, "alphas": list(map(float, opts.alphas)), "vocab_size": vocab}
    store = BlockStore(opts.out, config)
    if opts.restart and store.discard():
        log(f"--restart: discarded the checkpoint in {store.directory}")
    store.open(create=True)
    scorer = Scorer(head, streams, units, rule, opts.alphas, device=device, track_units=False)
    slices = batch_slices(plan.units.size, batch_size)
    every = int(opts.checkpoint_every)
    n_blocks = math.ceil(len(slices) / every)
    unit_tokens = units.sizes(plan.units)
    total = BucketedState.empty(edges, opts.alphas, vocab)
    bar = None
    if opts.progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.scored_tokens, unit="tok", unit_scale=True, dynamic_ncols=True, desc="length")
    t0 = time.perf_counter()
    scored = 0
    try:
        for j in range(n_blocks):
            block = slices[j * every:(j + 1) * every]
            saved = store.load(j)
            if saved is not None:
                state = BucketedState.from_state_dict(saved)
                if bar is not None:
                    bar.update(int(unit_tokens[block[0].start:block[-1].stop].sum()))
            else:
                state = BucketedState.empty(edges, opts.alphas, vocab)
                for sl in block:
                    n = scorer.batch(plan.units[sl], plan.weights[sl], state)
                    scored += n
                    if bar is not None:
                        bar.update(n)
                store.save(j, state.state_dict())
            total.merge(state)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    if not np.array_equal(total.pos_count, expected):
        raise RuntimeError("scored targets per position differ from the full pass's populations; the checkpoint "
                           "or the window rule is inconsistent (rerun with --restart)")
    pb = total.position_buckets(trained_positions)
    records = bucket_bounds(total, coded.coded_bits, delta=opts.delta, extra_bits=opts.extra_bits,
                            vocab_size=vocab)
    for rec, beyond in zip(records, pb.beyond_training.tolist(), strict=True):
        rec["beyond_training"] = bool(beyond)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_pos = total.pos_nll_sum_bits / total.pos_count
    doc = {
        "format": FORMAT, "model": opts.model, "model_kind": lm.kind,
        "position_encoding": getattr(getattr(lm.model, "config", None), "position_encoding", None)
        if lm.kind == "tokenbounds-gpt" else None,
        "training_context": train_context, "trained_positions": trained_positions,
        "training_context_source": "GPTConfig.context_length (the training length)" if lm.kind == "tokenbounds-gpt"
        else "the model config's max positions (the training length of an HF model is not recorded)",
        "longest_input": limit, "max_length": L, "m": int(plan.m), "vocab_size": vocab,
        "rule": rule.to_dict(), "prefix_source": prefix_source,
        "delta": float(opts.delta), "buckets_paid": len(records),
        "union": f"each of the B = {len(records)} bucket bounds is at delta / B = {opts.delta / len(records):.4g}; "
                 "all hold together with probability >= 1 - delta",
        "coded": {"coded_bits": coded.coded_bits, "method": coded.method, "description": coded.description},
        "extra_bits": float(opts.extra_bits), "buckets": records, "populations": pb.counts.tolist(),
        "per_position": {"count": total.pos_count.tolist(),
                         "mean_nll_bits": [None if not math.isfinite(v) else float(v) for v in per_pos]},
        "run": {"device": str(device), "threads": threads, "batch_size": batch_size, "blocks": n_blocks, "tokens_scored_this_run": scored,
                "seconds_scoring": round(elapsed, 3), "seconds_total": round(time.perf_counter() - t_start, 3),
                "load_average": [round(x, 2) for x in os.getloadavg()], "config_sha256": config_hash(config)},
        "files": {"json": "length.json"},
    }
    if opts.plots:
        plot_length(doc, os.path.join(opts.out, "length.png"))
        doc["files"]["png"] = "length.png"
    atomic_write_text(os.path.join(opts.out, "length.json"), json.dumps(doc, indent=1))
    return doc


def plot_length(doc: dict[str, Any], path: str) -> str:
    """Loss by position (per position, thin) and each bucket's mean and bound (steps) against the
    position on a log axis, the training context T marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    per = doc["per_position"]["mean_nll_bits"]
    pos = np.arange(1, len(per) + 1)
    ax.plot(pos, [np.nan if v is None else v for v in per], lw=0.8, alpha=0.6, color="tab:blue",
            label="loss by position (unsmoothed)")
    recs = [r for r in doc["buckets"] if r.get("bound_bits") is not None]
    log2v = math.log2(doc["vocab_size"])
    # bounds far above log2 V would flatten the losses: the axis stops at 1.5 x the largest loss or
    # log2 V, and bounds above it are drawn at the top as triangles
    top = 1.5 * max([log2v] + [v for v in per if v is not None] + [r["mean_nll_bits"] for r in recs])
    clipped = False
    for i, r in enumerate(recs):
        lo, hi = r["positions"]
        x = [lo, hi + 1]
        ax.plot(x, [r["mean_nll_bits"]] * 2, color="tab:blue", lw=2, label="bucket mean loss" if i == 0 else None)
        if r["bound_bits"] <= top:
            ax.plot(x, [r["bound_bits"]] * 2, color="tab:red", lw=2,
                    label=f"bucket bound (delta/{doc['buckets_paid']} each)" if i == 0 else None)
        else:
            ax.plot([math.sqrt(lo * (hi + 1))], [top * 0.97], marker="^", color="tab:red", ls="none",
                    label=None if clipped else "bound above the axis")
            clipped = True
    ax.axhline(log2v, color="gray", ls="--", lw=1, label="log2 V (vacuous)")
    ax.set_ylim(0, top)
    t = doc.get("trained_positions")
    if t and t < doc["max_length"]:
        ax.axvline(t + 0.5, color="black", ls=":", lw=1.2, label=f"training context (T = {doc['training_context']})")
    ax.set_xscale("log")
    ax.set_xlabel("position: tokens of context before the scored token")
    ax.set_ylabel("bits per token")
    enc = doc.get("position_encoding")
    ax.set_title(f"{os.path.basename(os.path.normpath(doc['model']))}" + (f" ({enc})" if enc else "")
                 + f", m = {doc['m']:,}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
