"""The length-generalization sweep: tasks x position encodings x seeds, trained on sizes <= T and
scored at T, 2T and 4T (answer-token accuracy by a plain batched forward).

Every trained model is cached under ``run_dir/models/<task>-<encoding>-seed<k>-<hash>/`` (the
GPT, and ``train.json`` with the training record), the hash covering everything that determines
the model (task, sizes, model and training configuration). A rerun, or a run after an interrupt,
trains only the models that are missing and re-evaluates all of them. Learned absolute positions
are evaluated at T only: their embeddings exist for the trained positions alone, and the model
refuses longer inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..eval.checkpoint import atomic_write_text, config_hash
from ..eval.train import TrainConfig
from ..models.gpt import POSITION_ENCODINGS
from .tasks import Task, make_task

FORMAT = "tokenbounds.length-sweep/1"
DEFAULT_SEEDS = (0, 1, 2)  # the README sweep's training seeds


@dataclass(frozen=True)
class TaskSpec:
    """A task, the largest training size T, and the task's options."""

    name: str
    train_size: int
    options: tuple[tuple[str, Any], ...] = ()
    steps: int | None = None  # overrides SweepConfig.steps for this task

    def build(self) -> Task:
        return make_task(self.name, **dict(self.options))

    @property
    def label(self) -> str:
        return self.name


@dataclass(frozen=True)
class SweepConfig:
    tasks: tuple[TaskSpec, ...]
    encodings: tuple[str, ...] = POSITION_ENCODINGS
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    multiples: tuple[int, ...] = (1, 2, 4)  # evaluated at sizes k * T
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    eval_examples: int = 512
    eval_seed: int = 10_000  # disjoint from the training streams, which use [seed, step]

    def __post_init__(self) -> None:
        bad = [e for e in self.encodings if e not in POSITION_ENCODINGS]
        if bad:
            raise ValueError(f"unknown position encodings {bad}; choose from {POSITION_ENCODINGS}")
        if not self.tasks or not self.seeds or not self.encodings:
            raise ValueError("the sweep needs at least one task, one encoding and one seed")
        if any(k < 1 for k in self.multiples) or 1 not in self.multiples:
            raise ValueError(f"multiples must be integers >= 1 and include 1 (the training size), got {self.multiples}")

    def train_config(self, spec: TaskSpec, seed: int) -> TrainConfig:
        return TrainConfig(steps=spec.steps or self.steps, batch_size=self.batch_size, lr=self.lr,
                           weight_decay=0.0, warmup_steps=self.warmup_steps, seed=seed, max_seconds=None)


# The README sweep. T and steps per task fit the training budget (about 1 minute per model on one
# quiet core): 8-digit addition stayed at ~20% digit accuracy at T after 2000 steps, 4 digits are
# learned; parity at 16 bits is learned only in part; copy and retrieval are learned at T.
DEFAULT_TASKS = (
    TaskSpec("copy", 16, (("num_symbols", 16),), steps=1000),
    TaskSpec("parity", 16, steps=1000),
    TaskSpec("addition", 4, steps=2000),
    TaskSpec("retrieval", 32, (("num_values", 16),), steps=600),
)


def chance_accuracy(task: Task) -> float:
    """Accuracy of guessing uniformly among the possible answer tokens."""
    return {"copy": lambda t: 1 / t.num_symbols, "parity": lambda t: 0.5, "addition": lambda t: 0.1,
            "retrieval": lambda t: 1 / t.num_values}[task.name](task)


def model_key(cfg: SweepConfig, spec: TaskSpec, task: Task, encoding: str, seed: int) -> dict[str, Any]:
    from ..models.gpt import GPTConfig

    mcfg = GPTConfig(vocab_size=task.vocab_size, context_length=task.sequence_length(spec.train_size) - 1,
                     n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model, position_encoding=encoding)
    return {"format": FORMAT, "task": task.describe(), "train_sizes": [1, spec.train_size],
            "model": asdict(mcfg), "train": asdict(cfg.train_config(spec, seed))}


def train_or_load(cfg: SweepConfig, spec: TaskSpec, encoding: str, seed: int, run_dir: str, *,
                  fresh: bool = False, progress: bool = False, log: Callable[[str], None] = print):
    """The trained model of one cell (from the cache when present) and its training record."""
    import torch

    from ..models.gpt import GPT, GPTConfig
    from .train import train_on_task

    task = spec.build()
    key = model_key(cfg, spec, task, encoding, seed)
    mdir = os.path.join(run_dir, "models", f"{spec.label}-{encoding}-seed{seed}-{config_hash(key)[:12]}")
    record_path = os.path.join(mdir, "train.json")
    if fresh and os.path.isdir(mdir):
        shutil.rmtree(mdir)
    if os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record.get("key") == key:
            return GPT.load(os.path.join(mdir, "model")), record, True
        log(f"{mdir}: cached model was trained with another configuration; retraining")
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**key["model"]))
    cpu0 = time.process_time()
    result = train_on_task(model, task, spec.train_size, cfg.train_config(spec, seed), progress=progress,
                           desc=f"{spec.label}/{encoding}/seed{seed}")
    model.save(os.path.join(mdir, "model"))
    record = {"key": key, "result": result.to_dict(), "threads": torch.get_num_threads(),
              "cpu_seconds": time.process_time() - cpu0, "load_average": os.getloadavg()[0],
              "parameters": model.config.num_parameters()}
    atomic_write_text(record_path, json.dumps(record, indent=1))  # written last: marks the model complete
    return model, record, False


def run_sweep(cfg: SweepConfig, run_dir: str, *, fresh: bool = False, progress: bool = True,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or load) every (task, encoding, seed) model and score it at k * T for k in
    ``cfg.multiples``; returns a JSON-able dict with one record per cell and per length."""
    from .train import answer_accuracy

    cells = [(spec, enc, seed) for spec in cfg.tasks for enc in cfg.encodings for seed in cfg.seeds]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cells), desc="length sweep", unit="model", dynamic_ncols=True)
    records = []
    t_start = time.perf_counter()
    try:
        for spec, enc, seed in cells:
            task = spec.build()
            model, record, cached = train_or_load(cfg, spec, enc, seed, run_dir, fresh=fresh,
                                                  progress=progress, log=log)
            t0 = time.perf_counter()
            evals = []
            for k in cfg.multiples:
                size = k * spec.train_size
                if model.max_length is not None and task.sequence_length(size) - 1 > model.max_length:
                    evals.append({"size": size, "multiple": k, "skipped": "learned absolute positions "
                                  f"exist only for the {model.max_length} trained positions"})
                    continue
                evals.append({"multiple": k, **answer_accuracy(model, task, size, cfg.eval_examples, cfg.eval_seed)})
            records.append({"task": spec.label, "encoding": enc, "seed": seed, "train_size": spec.train_size,
                            "cached": cached, "train_seconds": record["result"]["train_seconds"],
                            "train_cpu_seconds": record["cpu_seconds"], "train_load": record["load_average"],
                            "train_threads": record["threads"], "parameters": record["parameters"],
                            "final_loss_nats": record["result"]["losses_nats"][-1],
                            "eval_seconds": time.perf_counter() - t0, "evals": evals})
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return {"format": FORMAT, "config": {**asdict(cfg), "tasks": [asdict(t) for t in cfg.tasks]},
            "chance": {spec.label: chance_accuracy(spec.build()) for spec in cfg.tasks},
            "sequence_lengths": {spec.label: {str(k): spec.build().sequence_length(k * spec.train_size)
                                               for k in cfg.multiples} for spec in cfg.tasks},
            "records": records, "seconds": time.perf_counter() - t_start}


@dataclass
class Cell:
    """Accuracy at one (task, encoding, multiple) over the seeds."""

    values: list[float] = field(default_factory=list)
    skipped: str | None = None

    def text(self) -> str:
        if self.skipped is not None or not self.values:
            return "n/a"
        v = np.asarray(self.values)
        if len(v) == 1:
            return f"{v[0]:.2f}"
        return f"{v.mean():.2f} ({v.min():.2f}-{v.max():.2f})"


def summarize(result: dict[str, Any], metric: str = "token_accuracy") -> dict[tuple[str, str, int], Cell]:
    cells: dict[tuple[str, str, int], Cell] = {}
    for rec in result["records"]:
        for ev in rec["evals"]:
            cell = cells.setdefault((rec["task"], rec["encoding"], ev["multiple"]), Cell())
            if "skipped" in ev:
                cell.skipped = ev["skipped"]
            else:
                cell.values.append(ev[metric])
    return cells


def markdown(result: dict[str, Any]) -> str:
    """The accuracy table: one row per (task, encoding), columns T, 2T, 4T (mean and min-max
    over seeds), plus chance and the mean training time (CPU seconds of the training process,
    and wall seconds, which depend on the machine's load)."""
    cfg = result["config"]
    multiples = cfg["multiples"]
    cells = summarize(result)
    seq = summarize(result, "sequence_accuracy")
    heads = [("T" if k == 1 else f"{k}T") for k in multiples]
    lines = ["| task (T) | encoding | " + " | ".join(f"acc @ {h}" for h in heads)
             + f" | all answers right @ {heads[-1]} | chance | train CPU s (wall) |",
             "|---|---|" + "---|" * (len(heads) + 3)]
    for spec in cfg["tasks"]:
        name = spec["name"]
        for enc in cfg["encodings"]:
            recs = [r for r in result["records"] if r["task"] == name and r["encoding"] == enc]
            if not recs:
                continue
            row = [cells[(name, enc, k)].text() for k in multiples]
            last = seq[(name, enc, multiples[-1])].text()
            cpu = np.mean([r["train_cpu_seconds"] for r in recs])
            wall = np.mean([r["train_seconds"] for r in recs])
            lines.append(f"| {name} ({spec['train_size']}) | {enc} | " + " | ".join(row)
                         + f" | {last} | {result['chance'][name]:.2f} | {cpu:.0f} ({wall:.0f}) |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> str:
    """Answer-token accuracy against size / T, one panel per task, one line per encoding (mean,
    bars: min-max over seeds), chance dashed, the training size marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    cells = summarize(result)
    tasks = [t["name"] for t in cfg["tasks"]]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.5), sharey=True, squeeze=False)
    for ax, spec in zip(axes[0], cfg["tasks"], strict=True):
        name = spec["name"]
        for i, enc in enumerate(cfg["encodings"]):
            ks = [k for k in cfg["multiples"] if (name, enc, k) in cells and cells[(name, enc, k)].values]
            if not ks:
                continue
            v = [np.asarray(cells[(name, enc, k)].values) for k in ks]
            mean = np.array([x.mean() for x in v])
            err = np.array([[m - x.min() for m, x in zip(mean, v, strict=True)], [x.max() - m for m, x in zip(mean, v, strict=True)]])
            shift = 2.0 ** (0.04 * (i - (len(cfg["encodings"]) - 1) / 2))  # keep overlapping bars apart
            ax.errorbar(np.asarray(ks) * shift, mean, yerr=err, marker="o", capsize=3, label=enc)
        ax.axhline(result["chance"][name], color="gray", ls="--", lw=1, label="chance")
        ax.axvline(1, color="black", ls=":", lw=1)  # the training size T
        ax.set_xscale("log", base=2)
        ax.set_xticks(cfg["multiples"], [("T" if k == 1 else f"{k}T") for k in cfg["multiples"]])
        ax.set_title(f"{name} (T = {spec['train_size']})")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("task size")
    axes[0][0].set_ylabel("answer-token accuracy")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
