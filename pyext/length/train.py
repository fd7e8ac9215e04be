"""Train a GPT on a synthetic task and score its answer tokens.

Training reuses tokenbounds.eval.train's schedule (:class:`TrainConfig`: AdamW, warmup + cosine,
gradient clipping) with task batches instead of windows of a token file: at step s the sizes are
drawn uniformly from ``min_size..max_size`` and the batch is ``task.batch(sizes, seed=[seed, s])``,
so a run is a function of its configuration. The loss is the cross-entropy of the answer tokens
only (the inputs of copy, parity and retrieval are random and cannot be learned).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..eval.train import TrainConfig, TrainResult, _param_groups
from .tasks import Task


def task_batch(task: Task, min_size: int, max_size: int, batch_size: int, seed: int, step: int):
    """The training batch of one step (sizes uniform in min_size..max_size)."""
    rng = np.random.default_rng([int(seed), int(step), 1])
    sizes = rng.integers(min_size, max_size + 1, size=batch_size)
    return task.batch(sizes, seed=[int(seed), int(step)])


def train_on_task(model, task: Task, max_size: int, cfg: TrainConfig, *, min_size: int = 1,
                  progress: bool = False, desc: str = "train") -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` steps on sizes min_size..max_size of ``task``.

    The model's ``context_length`` must hold the longest training sequence (``task.sequence_length
    (max_size) - 1`` inputs)."""
    import torch

    if not 1 <= min_size <= max_size:
        raise ValueError(f"training sizes must satisfy 1 <= min_size <= max_size, got {min_size}..{max_size}")
    need = task.sequence_length(max_size) - 1
    if model.config.context_length < need:
        raise ValueError(f"{task.name} of size {max_size} feeds {need} tokens but the model's "
                         f"context_length is {model.config.context_length}")
    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    result = TrainResult(steps=cfg.steps, tokens_seen=0, train_seconds=0.0)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc=desc, unit="step", dynamic_ncols=True, leave=False)
    model.train()
    chunk: list[float] = []
    t0 = time.perf_counter()
    step = 0
    try:
        while cfg.progress(step, result.train_seconds) < 1.0:
            x, y = task_batch(task, min_size, max_size, cfg.batch_size, cfg.seed, step).inputs_targets()
            for g in optimizer.param_groups:
                g["lr"] = cfg.lr_at(step, result.train_seconds)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                _, loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            result.tokens_seen += int((y != -100).sum())
            chunk.append(float(loss.detach()))
            result.train_seconds = time.perf_counter() - t0
            if len(chunk) == 10 or cfg.progress(step, result.train_seconds) >= 1.0:
                result.losses_nats.append(float(np.mean(chunk)))
                chunk = []
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{result.losses_nats[-1] if result.losses_nats else chunk[-1]:.3f}")
    finally:
        if bar is not None:
            bar.close()
    result.steps = step
    model.eval()
    return result


def answer_accuracy(model, task: Task, size: int, num_examples: int, seed: int, batch_size: int = 256) -> dict[str, Any]:
    """Greedy (argmax) accuracy on the answer tokens of ``num_examples`` size-``size`` sequences
    drawn with ``seed``, by a plain batched forward (teacher forcing: each answer token is
    predicted from the true prefix). Returns token accuracy, the fraction of sequences whose
    answer tokens are all right, and the answer-token loss (bits)."""
    import torch

    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    correct = total = seq_correct = 0
    loss_nats = 0.0
    model.eval()
    with torch.no_grad():
        for start in range(0, num_examples, batch_size):
            n = min(batch_size, num_examples - start)
            x, y = task.batch(size, seed=[int(seed), int(size), start], count=n).inputs_targets()
            logits = model(x).float()
            scored = y != -100
            hit = (logits.argmax(-1) == y) & scored
            correct += int(hit.sum())
            total += int(scored.sum())
            seq_correct += int((hit.sum(1) == scored.sum(1)).sum())
            loss_nats += float(torch.nn.functional.cross_entropy(
                logits[scored], y[scored], reduction="sum"))
    return {"size": int(size), "examples": int(num_examples), "answer_tokens": total,
            "token_accuracy": correct / total, "sequence_accuracy": seq_correct / num_examples,
            "loss_bits": loss_nats / total / np.log(2.0)}
