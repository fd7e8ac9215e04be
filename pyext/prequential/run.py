"""Prequential code length and excess description length of a real training run.

One pass over the training examples, in batches: batch j is scored by the model theta_{j-1}
*before* the optimizer step that trains on it (the forward pass of that step, per-token losses
accumulated in float64), so

    MDL(n) = sum_{j <= n} l(theta_{j-1}; batch_j)           (bits)
    EDL(n) = MDL(n) - N_tok(n) * L_test(theta_n)             (spec/bounds.md section 8)

with ``L_test`` the held-out loss per scored token of the model after the n-th batch and
``N_tok(n)`` the scored tokens of the first n batches (Donoway et al., arXiv 2601.04728). EDL is
reported per run, per sample (training row), per scored token and per *trained* parameter (all
of them, or the LoRA adapters' only).

**Nested prefixes.** EDL as a function of the dataset size n needs, for each prefix of the
data, the model trained on that prefix only. With a learning-rate schedule that does not depend
on the run's length (``schedule="constant"``: linear warmup, then constant) the run on a prefix
*is* the first n steps of the run on all the data (same batches, same updates), so one pass
gives every prefix: MDL(n) is a partial sum and theta_n is evaluated on the held-out rows when
step n is reached. The cost is one training pass plus ``len(prefix grid)`` held-out evaluations
per seed. With ``schedule="cosine"`` the schedule depends on the run's length, so each prefix is
its own run (cost: the sum of the prefix lengths, ~2x one pass for the doubling grid).

**Seeds.** Each seed changes the initialisation (of a from-scratch model, or of LoRA's A) and,
with ``shuffle``, the order of the training rows (each prefix is then a fresh random subset of
the data, as in Donoway et al.'s E[EDL]); means and standard errors are over seeds.

Training reuses :func:`tokenbounds.eval.train.train` (its ``batch_fn`` / ``loss_fn`` /
``on_step`` options); its checkpoint carries the recorder, so an interrupted run resumes at the
last checkpoint with the recorded losses of the steps before it, and every finished seed is
written atomically as its own JSON file.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from ..bounds import excess_description_length, prequential_code_length

__all__ = [
    "IGNORE_INDEX",
    "PreparedModel",
    "PrequentialConfig",
    "PrequentialRecorder",
    "Rows",
    "TensorRows",
    "WindowRows",
    "causal_lm_token_losses",
    "evaluate_rows",
    "prefix_grid",
    "run_prequential",
    "summarize",
]

IGNORE_INDEX = -100
LN2 = math.log(2.0)
FORMAT = "tokenbounds.prequential/1"


# ----------------------------------------------------------------------------- data as rows
class Rows(Protocol):
    """Training or held-out examples: ``len(rows)`` rows of ``T`` input and target tokens
    (target ``-100`` = not scored); ``batch(indices)`` gives int64 tensors [len(indices), T]."""

    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray) -> tuple[Any, Any]: ...

    @property
    def context_length(self) -> int: ...

    @property
    def scored_per_row(self) -> int: ...


@dataclass
class TensorRows:
    """Rows held in memory (the toy tasks): ``inputs``, ``targets`` int64 [N, T]; every row must
    score the same number of tokens (so that a batch of B rows scores ``B * scored_per_row``)."""

    inputs: Any
    targets: Any

    def __post_init__(self) -> None:
        if self.inputs.shape != self.targets.shape or self.inputs.dim() != 2:
            raise ValueError(f"inputs {tuple(self.inputs.shape)} and targets {tuple(self.targets.shape)} "
                             "must both be [rows, T]")
        counts = (self.targets != IGNORE_INDEX).sum(1)
        if len(counts) and not bool((counts == counts[0]).all()):
            raise ValueError("every row must score the same number of tokens")
        if len(counts) and int(counts[0]) == 0:
            raise ValueError("the rows score no token (every target is -100)")

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def context_length(self) -> int:
        return int(self.inputs.shape[1])

    @property
    def scored_per_row(self) -> int:
        return int((self.targets[0] != IGNORE_INDEX).sum()) if len(self) else 0

    def batch(self, indices: np.ndarray) -> tuple[Any, Any]:
        import torch

        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return self.inputs[idx], self.targets[idx]

    def subset(self, indices: np.ndarray) -> TensorRows:
        x, y = self.batch(indices)
        return TensorRows(x, y)


@dataclass
class WindowRows:
    """Rows cut from token files: row r of file f is ``tokens_f[s : s + T + 1]`` with
    ``s = r T`` (inputs the first T, targets the last T, all scored), as in
    :func:`tokenbounds.eval.train.sequential_batch`; rows never cross a file boundary.
    ``row_file`` / ``row_start`` list the rows this object holds (a split keeps a subset)."""

    files: list[np.ndarray]
    T: int
    row_file: np.ndarray = field(default=None)  # type: ignore[assignment]
    row_start: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.T < 1:
            raise ValueError(f"context length must be >= 1, got {self.T}")
        if self.row_file is None:
            per_file = [max(0, (len(f) - 1) // self.T) for f in self.files]
            self.row_file = np.concatenate([np.full(n, i, np.int64) for i, n in enumerate(per_file)]
                                           or [np.zeros(0, np.int64)])
            self.row_start = np.concatenate([np.arange(n, dtype=np.int64) * self.T for n in per_file]
                                            or [np.zeros(0, np.int64)])

    def __len__(self) -> int:
        return int(self.row_file.size)

    @property
    def context_length(self) -> int:
        return self.T

    @property
    def scored_per_row(self) -> int:
        return self.T

    def batch(self, indices: np.ndarray) -> tuple[Any, Any]:
        import torch

        idx = np.asarray(indices, dtype=np.int64)
        win = np.stack([np.asarray(self.files[self.row_file[i]][self.row_start[i]: self.row_start[i] + self.T + 1],
                                   dtype=np.int64) for i in idx])
        w = torch.from_numpy(win)
        return w[:, :-1], w[:, 1:]

    def subset(self, indices: np.ndarray) -> WindowRows:
        idx = np.asarray(indices, dtype=np.int64)
        return WindowRows(self.files, self.T, self.row_file[idx], self.row_start[idx])

    def max_token(self) -> int:
        """Largest token id in these rows' windows (one pass over the rows' tokens)."""
        best = -1
        for f in np.unique(self.row_file):
            starts = self.row_start[self.row_file == f]
            lo, hi = int(starts.min()), int(starts.max()) + self.T + 1
            best = max(best, int(np.asarray(self.files[f][lo:hi]).max()))
        return best


# ----------------------------------------------------------------------------- model + loss
@dataclass
class PreparedModel:
    """A model ready to train: ``trained_parameters`` counts what the optimizer updates (LoRA's
    parameters only when adapters are installed), ``total_parameters`` every parameter."""

    model: Any
    trained_parameters: int
    total_parameters: int
    description: dict[str, Any] = field(default_factory=dict)


def causal_lm_token_losses(model, inputs, targets):
    """Per-token cross-entropy [B, T] in nats (0 where the target is -100) of a causal LM whose
    ``model(x)`` returns logits (our GPT) or an output with ``.logits`` (Hugging Face).

    Puts the model in eval mode first: scoring and training then share one deterministic forward
    pass (no dropout), so the training forward *is* the prequential score of the batch."""
    import torch.nn.functional as F

    model.eval()
    out = model(inputs)
    logits = getattr(out, "logits", out)
    v = logits.shape[-1]
    return F.cross_entropy(logits.float().reshape(-1, v), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="none").view(targets.shape)


def evaluate_rows(model, rows: Rows, *, batch_rows: int = 64, loss_fn=causal_lm_token_losses,
                  device: str = "cpu") -> dict[str, float]:
    """Held-out loss of ``model`` over every row: mean bits per scored token (float64 sums) and
    its standard error over rows."""
    import torch

    was_training = model.training
    n = len(rows)
    if n == 0:
        raise ValueError("no held-out rows to evaluate")
    row_sums = np.zeros(n, np.float64)
    row_counts = np.zeros(n, np.int64)
    with torch.no_grad():
        for lo in range(0, n, batch_rows):
            idx = np.arange(lo, min(n, lo + batch_rows))
            x, y = rows.batch(idx)
            tl = loss_fn(model, x.to(device), y.to(device))
            row_sums[idx] = tl.double().sum(1).cpu().numpy()
            row_counts[idx] = (y != IGNORE_INDEX).sum(1).numpy()
    model.train(was_training)
    per_row = row_sums / np.maximum(row_counts, 1) / LN2
    tokens = int(row_counts.sum())
    mean = float(row_sums.sum() / tokens / LN2)
    se = float(per_row.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"loss_bits": mean, "loss_se_bits": se, "rows": n, "tokens": tokens}


# ----------------------------------------------------------------------------- recording
class PrequentialRecorder:
    """``train(on_step=...)`` hook recording each batch's code length before its update: float64
    sums of the per-token losses (nats) and the number of scored tokens, indexed by step (so a
    step recorded twice, around an interruption, is overwritten rather than counted twice).

    Checkpointed by :func:`~tokenbounds.eval.train.train` through ``state_dict``."""

    def __init__(self, num_steps: int):
        self.num_steps = int(num_steps)
        self.loss_nats = np.zeros(self.num_steps, np.float64)
        self.tokens = np.zeros(self.num_steps, np.int64)
        self.done = np.zeros(self.num_steps, bool)

    def __call__(self, record) -> None:
        s = int(record.step)
        if not 0 <= s < self.num_steps:
            raise IndexError(f"step {s} outside the recorder's {self.num_steps} steps")
        mask = record.targets != IGNORE_INDEX
        self.loss_nats[s] = float(record.token_losses.double()[mask].sum())
        self.tokens[s] = int(mask.sum())
        self.done[s] = True

    @property
    def steps_recorded(self) -> int:
        return int(self.done.sum())

    def loss_bits(self, steps: int | None = None) -> np.ndarray:
        """Code length of each of the first ``steps`` batches, in bits."""
        k = self.num_steps if steps is None else int(steps)
        if not self.done[:k].all():
            missing = int(np.flatnonzero(~self.done[:k])[0])
            raise RuntimeError(f"step {missing} was never recorded (the run stopped before it)")
        return self.loss_nats[:k] / LN2

    def mdl_bits(self, steps: int | None = None) -> float:
        """MDL of the first ``steps`` batches, in bits (:func:`tokenbounds.bounds.prequential_code_length`)."""
        return prequential_code_length(self.loss_bits(steps))

    def state_dict(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps, "loss_nats": self.loss_nats.copy(), "tokens": self.tokens.copy(),
                "done": self.done.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_steps"]) != self.num_steps:
            raise ValueError(f"recorder state has {state['num_steps']} steps, this run {self.num_steps}")
        self.loss_nats = np.asarray(state["loss_nats"], np.float64).copy()
        self.tokens = np.asarray(state["tokens"], np.int64).copy()
        self.done = np.asarray(state["done"], bool).copy()


class _PrefixRecorder(PrequentialRecorder):
    """Also evaluates the held-out loss of theta_n when the n-th batch of the grid is done."""

    def __init__(self, num_steps: int, grid: Sequence[int], evaluate: Callable[[Any], dict[str, float]],
                 model, extra: Callable[[Any], None] | None = None):
        super().__init__(num_steps)
        self.grid = {int(g) for g in grid}
        self.evaluate = evaluate
        self.model = model
        self.tests: dict[int, dict[str, float]] = {}
        self.extra = extra

    def __call__(self, record) -> None:
        super().__call__(record)
        if self.extra is not None:
            self.extra(record)
        n = int(record.step) + 1
        if n in self.grid:
            self.tests[n] = self.evaluate(self.model)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "tests": {str(k): v for k, v in self.tests.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.tests = {int(k): dict(v) for k, v in state.get("tests", {}).items()}


# ----------------------------------------------------------------------------- config
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class PrequentialConfig:
    """The training algorithm (fixed across seeds and prefixes: EDL depends on it) and the
    measurement. ``batch_rows`` rows per step; ``prefix_steps`` overrides the doubling grid of
    ``prefixes`` prefix lengths (in steps) ending at the full run."""

    lr: float = 1e-3
    batch_rows: int = 8
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seeds: tuple[int, ...] = (0,)
    shuffle: bool = True
    prefixes: int = 8
    prefix_steps: tuple[int, ...] | None = None
    eval_batch_rows: int = 64
    information_content: bool = False
    checkpoint_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {self.batch_rows}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        if self.prefixes < 1:
            raise ValueError(f"prefixes must be >= 1, got {self.prefixes}")

    def train_config(self, steps: int, seed: int):
        from ..eval.train import TrainConfig

        return TrainConfig(
            steps=int(steps), batch_size=self.batch_rows, lr=self.lr,
            min_lr_ratio=1.0 if self.schedule == "constant" else self.min_lr_ratio,
            warmup_steps=self.warmup_steps, weight_decay=self.weight_decay, grad_clip=self.grad_clip,
            seed=int(seed), checkpoint_every=10**9, checkpoint_seconds=self.checkpoint_seconds,
            max_seconds=None)


def prefix_grid(total_steps: int, prefixes: int, explicit: Sequence[int] | None = None) -> list[int]:
    """Prefix lengths in steps: ``explicit`` (sorted, each in 1..total) or the doubling grid
    ``round(total / 2^k)``, k = prefixes-1 .. 0 (duplicates and zeros dropped; ends at total)."""
    if total_steps < 1:
        raise ValueError("the run has no step")
    if explicit:
        grid = sorted({int(s) for s in explicit})
        if grid[0] < 1 or grid[-1] > total_steps:
            raise ValueError(f"prefix steps must lie in 1..{total_steps}, got {grid}")
        return grid
    return sorted({max(1, round(total_steps / 2**k)) for k in range(prefixes)})


# ----------------------------------------------------------------------------- the run
def _edl_entry(rec: PrequentialRecorder, steps: int, test: dict[str, float], rows_per_step: int,
               trained: int) -> dict[str, Any]:
    losses = rec.loss_bits(steps)
    tokens = rec.tokens[:steps]
    if not (tokens == tokens[0]).all():
        raise RuntimeError("batches scored different numbers of tokens")
    # excess_description_length takes one loss per example: a batch, whose held-out loss is
    # (tokens per batch) x (held-out bits per token).
    res = excess_description_length(losses, test["loss_bits"] * float(tokens[0]),
                                    num_tokens=int(tokens.sum()), num_parameters=trained)
    rows = steps * rows_per_step
    return {"steps": int(steps), "rows": int(rows), "tokens": int(tokens.sum()), "mdl_bits": res.mdl,
            "test_loss_bits": test["loss_bits"], "test_loss_se_bits": test["loss_se_bits"],
            "test_tokens": int(test["tokens"]),
            "edl_bits": res.edl, "edl_per_sample": res.edl / rows, "edl_per_token": res.edl_per_token,
            "edl_per_parameter": res.edl_per_parameter,
            "mdl_per_token": res.mdl / int(tokens.sum())}


def _write_json(path: str, obj: Any) -> None:
    from ..eval.fileio import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, allow_nan=True, default=float))


def _run_key(identity: dict[str, Any], cfg: PrequentialConfig, seed: int) -> str:
    from ..eval.fileio import json_sha256

    # what does not change the result stays out: the seed list (each seed has its own key), how
    # often to checkpoint, the evaluation batch size
    cfg_part = asdict(cfg) | {"seeds": None, "checkpoint_seconds": None, "eval_batch_rows": None}
    return json_sha256({"identity": identity, "config": cfg_part, "seed": int(seed), "format": FORMAT})


def run_seed(
    make_model: Callable[[int], PreparedModel],
    train_rows: Rows,
    test_rows: Rows,
    cfg: PrequentialConfig,
    seed: int,
    *,
    device: str = "cpu",
    loss_fn=causal_lm_token_losses,
    checkpoint_path: str | None = None,
    identity: dict[str, Any] | None = None,
    progress: bool = True,
    log=print,
    on_step: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """One seed: the prequential pass (or one pass per prefix with the cosine schedule), the
    held-out loss of every prefix's final model, and EDL for each prefix. ``on_step`` sees every
    training step's :class:`~tokenbounds.eval.train.StepRecord` (tests use it)."""
    from ..eval.train import train

    t0 = time.perf_counter()
    b = cfg.batch_rows
    total = len(train_rows) // b
    grid = prefix_grid(total, cfg.prefixes, cfg.prefix_steps)
    rng = np.random.default_rng([int(seed), 0x5EED])
    order = rng.permutation(len(train_rows)) if cfg.shuffle else np.arange(len(train_rows))

    def batch_fn(step: int):
        x, y = train_rows.batch(order[step * b: (step + 1) * b])
        return x.to(device), y.to(device)

    def evaluate(model) -> dict[str, float]:
        return evaluate_rows(model, test_rows, batch_rows=cfg.eval_batch_rows, loss_fn=loss_fn, device=device)

    key = _run_key(identity or {}, cfg, seed)
    runs = [total] if cfg.schedule == "constant" else grid
    prefixes: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    rec = None
    for run_steps in runs:
        prepared = make_model(seed)
        model = prepared.model.to(device)
        info = {"trained_parameters": prepared.trained_parameters, "total_parameters": prepared.total_parameters,
                **prepared.description}
        run_grid = grid if cfg.schedule == "constant" else [run_steps]
        rec = _PrefixRecorder(run_steps, run_grid, evaluate, model, extra=on_step)
        ckpt = None if checkpoint_path is None else f"{checkpoint_path}.{run_steps}.pt"
        train(model, None, cfg.train_config(run_steps, seed), checkpoint_path=ckpt, progress=progress,
              meta={"prequential": key, "steps": run_steps}, log=log, batch_fn=batch_fn, loss_fn=loss_fn,
              on_step=rec)
        for n in run_grid:
            if n not in rec.tests:  # resumed after the prefix's evaluation was lost: impossible by construction
                raise RuntimeError(f"prefix {n} has no held-out evaluation")
            prefixes.append(_edl_entry(rec, n, rec.tests[n], b, prepared.trained_parameters))
        if cfg.schedule == "cosine" or run_steps == runs[-1]:
            final_model = model
    result: dict[str, Any] = {
        "seed": int(seed), "key": key, "steps": total, "rows_per_step": b,
        "rows": total * b, "rows_available": len(train_rows), "tokens": int(rec.tokens.sum()),
        "prefixes": prefixes, "final": prefixes[-1], "model": info,
        "step_loss_bits": rec.loss_bits().tolist(),
        "train_tokens_per_step": int(rec.tokens[0]),
        "cost": {"train_steps": int(sum(runs)), "train_rows": int(sum(runs) * b), "training_runs": len(runs),
                 "held_out_evaluations": len(grid),
                 "held_out_tokens_per_evaluation": int(prefixes[-1]["test_tokens"])},
    }
    if cfg.information_content:
        from .information import information_content, replay_losses

        final = replay_losses(final_model, batch_fn, total, loss_fn=loss_fn, progress=progress)
        result["information_content"] = information_content(rec.loss_bits(), final / LN2,
                                                            num_tokens=int(rec.tokens.sum())).to_dict()
    result["seconds"] = time.perf_counter() - t0
    return result


def run_prequential(
    make_model: Callable[[int], PreparedModel],
    train_rows: Rows,
    test_rows: Rows,
    cfg: PrequentialConfig,
    *,
    out_dir: str | None = None,
    identity: dict[str, Any] | None = None,
    device: str = "cpu",
    loss_fn=causal_lm_token_losses,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Every seed of ``cfg`` (each resumable: a finished seed is kept in ``out_dir/seed-S.json``,
    an interrupted one continues from ``out_dir/checkpoint-seed-S.*.pt``), then :func:`summarize`.

    ``identity`` (model and data fingerprints) is hashed into each seed's key: a stored seed
    from another configuration raises ValueError instead of being mixed in."""
    if len(train_rows) < cfg.batch_rows:
        raise ValueError(
            f"a batch of {cfg.batch_rows} rows x {train_rows.context_length} tokens is larger than the "
            f"training data ({len(train_rows)} rows); use a smaller batch or more data")
    if len(test_rows) == 0:
        raise ValueError("the held-out split is empty; pass --test-data or more data")
    if train_rows.context_length != test_rows.context_length:
        raise ValueError(f"training rows have {train_rows.context_length} tokens, held-out rows "
                         f"{test_rows.context_length}")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    seeds = []
    for i, seed in enumerate(cfg.seeds):
        path = os.path.join(out_dir, f"seed-{seed}.json") if out_dir else None
        key = _run_key(identity or {}, cfg, seed)
        if path and os.path.exists(path):
            with open(path) as f:
                done = json.load(f)
            if done.get("key") != key:
                raise ValueError(f"{path} was written by a different configuration (model, data or "
                                 "training settings); use another --out or --restart")
            log(f"seed {seed}: reusing {path}")
            seeds.append(done)
            continue
        log(f"seed {seed} ({i + 1}/{len(cfg.seeds)}): {len(train_rows) // cfg.batch_rows} steps of "
            f"{cfg.batch_rows} rows x {train_rows.context_length} tokens")
        ckpt = os.path.join(out_dir, f"checkpoint-seed-{seed}") if out_dir else None
        res = run_seed(make_model, train_rows, test_rows, cfg, seed, device=device, loss_fn=loss_fn,
                       checkpoint_path=ckpt, identity=identity, progress=progress, log=log)
        if path:
            _write_json(path, res)
            _remove_checkpoints(ckpt)
        seeds.append(res)
    return summarize(seeds, cfg)


def _remove_checkpoints(prefix: str | None) -> None:
    if not prefix:
        return
    import glob

    for p in glob.glob(prefix + ".*.pt"):
        os.remove(p)


def _mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    arr = np.asarray(values, np.float64)
    if arr.size < 2:
        return float(arr.mean()), None
    return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(arr.size))


SUMMARY_KEYS = ("mdl_bits", "test_loss_bits", "edl_bits", "edl_per_sample", "edl_per_token",
                "edl_per_parameter", "mdl_per_token")


def summarize(seeds: Sequence[dict[str, Any]], cfg: PrequentialConfig | None = None) -> dict[str, Any]:
    """Mean and standard error over seeds of every prefix's quantities (SE is None for one seed)."""
    if not seeds:
        raise ValueError("no seed results to summarize")
    grids = [tuple(p["steps"] for p in s["prefixes"]) for s in seeds]
    if len(set(grids)) != 1:
        raise ValueError(f"seeds have different prefix grids: {sorted(set(grids))}")
    rows = []
    for k, steps in enumerate(grids[0]):
        ent: dict[str, Any] = {"steps": steps, "rows": seeds[0]["prefixes"][k]["rows"],
                               "tokens": seeds[0]["prefixes"][k]["tokens"]}
        for key in SUMMARY_KEYS:
            m, se = _mean_se([s["prefixes"][k][key] for s in seeds])
            ent[key] = m
            ent[key + "_se"] = se
        rows.append(ent)
    out: dict[str, Any] = {"format": FORMAT, "num_seeds": len(seeds), "seeds": [s["seed"] for s in seeds],
                           "prefixes": rows, "final": rows[-1], "model": seeds[0]["model"],
                           "per_seed": list(seeds)}
    if cfg is not None:
        out["config"] = asdict(cfg)
        per_seed_cost = seeds[0]["cost"]
        out["cost"] = {
            "num_prefixes": len(rows),
            "per_seed": per_seed_cost,
            "note": ("constant schedule: every prefix is a prefix of one run (one training pass + one held-out "
                     "evaluation per prefix)" if cfg.schedule == "constant" else
                     "cosine schedule: every prefix is its own training run"),
        }
    if all("information_content" in s for s in seeds):
        ks = [s["information_content"]["k_bits"] for s in seeds]
        m, se = _mean_se(ks)
        out["information_content"] = {"k_bits": m, "k_bits_se": se,
                                      "label": seeds[0]["information_content"]["label"]}
    return out
