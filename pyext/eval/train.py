"""Train :class:`tokenbounds.models.gpt.GPT` on a token file: AdamW, warmup + cosine schedule,
bf16 autocast on CPU, a tqdm progress bar, and an atomic checkpoint so an interrupted run
(Ctrl-C, kill) resumes where it stopped and ends with the same model as an uninterrupted run.

Batches are windows of ``context_length + 1`` tokens at offsets drawn from
``numpy.random.default_rng([seed, step])``, so the batch of a step does not depend on whether
the run was resumed.

Prequential coding (``spec/bounds.md`` section 8) needs two options, both off by default (the
default run is bit-identical with or without them): ``batch_fn`` replaces the random windows by
any step-indexed batches (e.g. :func:`sequential_batch`, one epoch in order), and ``on_step``
receives every batch's per-token losses computed in the forward pass *before* that batch's
optimizer update (the prequential code length of the batch), with ``state_dict`` /
``load_state_dict`` checkpointed alongside the model when the hook has them.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class TrainConfig:
    """``steps`` is the step budget; with ``max_seconds`` training also stops once that much
    training time has passed, and the schedule follows ``progress = max(step / steps,
    seconds / max_seconds)`` (time-budgeted runs are not bit-reproducible; step-budgeted ones are)."""

    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    bf16: bool = False  # bf16 autocast: ~6x slower than fp32 for d<=128 models on AVX2 CPUs
    checkpoint_every: int = 50
    checkpoint_seconds: float = 20.0
    max_seconds: float | None = None

    def progress(self, step: int, seconds: float) -> float:
        frac = step / max(1, self.steps)
        if self.max_seconds:
            frac = max(frac, seconds / self.max_seconds)
        return frac

    def lr_at(self, step: int, seconds: float = 0.0) -> float:
        """Linear warmup over the first ``warmup_steps`` steps (and, with a time budget, at most
        the first 5% of it), then cosine decay to ``min_lr_ratio * lr`` over the remaining progress."""
        p = self.progress(step, seconds)
        p_warm = self.warmup_steps / max(1, self.steps)
        if self.max_seconds:
            p_warm = min(p_warm, 0.05)
        if step < self.warmup_steps and p < p_warm:
            return self.lr * max((step + 1) / self.warmup_steps, p / p_warm)
        frac = min(1.0, max(0.0, (p - p_warm) / max(1e-9, 1.0 - p_warm)))
        cos = 0.5 * (1.0 + math.cos(math.pi * frac))
        return self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cos)


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    train_seconds: float
    losses_nats: list[float] = field(default_factory=list)  # mean loss per logged chunk
    resumed_from: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StepRecord:
    """What ``train(on_step=...)`` receives after each optimizer step.

    ``token_losses`` [B, T] (float32, nats, detached) are the losses of ``targets`` under the
    parameters *before* this step's update (0 where the target is -100, i.e. not scored)."""

    step: int
    inputs: Any
    targets: Any
    token_losses: Any
    lr: float


def sequential_batch(tokens: np.ndarray, batch_size: int, context_length: int, step: int,
                     order: np.ndarray | None = None):
    """Batch ``step`` of one epoch over ``tokens`` in order: row r is the window
    ``tokens[r T : r T + T + 1]`` (consecutive windows share one token, so every token after the
    first is a target exactly once per epoch), rows ``step B .. step B + B - 1`` (or
    ``order[step B ..]`` when a permutation of the rows is given). Inputs, targets [B, T] int64."""
    import torch

    t = int(context_length)
    rows = np.arange(step * batch_size, (step + 1) * batch_size)
    if order is not None:
        rows = np.asarray(order)[rows]
    if rows.size and (rows.max() + 1) * t + 1 > len(tokens):
        raise IndexError(f"batch {step} needs rows up to {int(rows.max())} but {len(tokens)} tokens hold "
                         f"{(len(tokens) - 1) // t} windows of {t} + 1 tokens")
    window = np.stack([np.asarray(tokens[r * t : r * t + t + 1], dtype=np.int64) for r in rows])
    w = torch.from_numpy(window)
    return w[:, :-1], w[:, 1:]


def get_batch(tokens: np.ndarray, batch_size: int, context_length: int, seed: int, step: int):
    """Inputs and next-token targets [B, T] (int64) from random windows of the token file."""
    import torch

    n = len(tokens)
    t = min(context_length, n - 1)
    rng = np.random.default_rng([int(seed), int(step)])
    offsets = rng.integers(0, n - t, size=batch_size)
    window = np.stack([np.asarray(tokens[o : o + t + 1], dtype=np.int64) for o in offsets])
    w = torch.from_numpy(window)
    return w[:, :-1], w[:, 1:]


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:  # frozen parameters (e.g. a LoRA base) are not optimized
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _save_checkpoint(path: str, model, optimizer, step: int, result: TrainResult, meta: dict,
                     hook=None) -> None:
    import torch

    from .fileio import atomic_path

    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "result": result.to_dict(), "meta": meta}
    if hook is not None and hasattr(hook, "state_dict"):
        ckpt["hook"] = hook.state_dict()
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def train(
    model,
    tokens: np.ndarray,
    cfg: TrainConfig,
    *,
    checkpoint_path: str | None = None,
    progress: bool = True,
    meta: dict | None = None,
    log=print,
    batch_fn: Callable[[int], tuple[Any, Any]] | None = None,
    loss_fn: Callable[[Any, Any, Any], Any] | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` steps on ``tokens``; resume from
    ``checkpoint_path`` when it exists and matches ``meta`` (a mismatch raises ValueError).

    On KeyboardInterrupt the checkpoint of the last completed step is written and the
    exception re-raised.

    Options (none changes the default run): ``batch_fn(step) -> (inputs, targets)`` supplies the
    batches instead of random windows of ``tokens`` (targets -100 are not scored; put whatever
    identifies the batches into ``meta``); ``loss_fn(model, inputs, targets) -> [B, T]`` per-token
    losses in nats (0 at -100) replaces ``model(inputs, targets)`` (for models with another
    forward signature, e.g. Hugging Face), the trained loss being their mean over scored tokens;
    ``on_step(StepRecord)`` is called after each update with the losses of the batch computed
    before it (see :class:`StepRecord`; its ``state_dict()`` is checkpointed and restored).
    """
    import torch
    import torch.nn.functional as F

    meta = {"train": asdict(cfg), **(meta or {})}
    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    result = TrainResult(steps=cfg.steps, tokens_seen=0, train_seconds=0.0)
    step = 0
    if checkpoint_path and os.path.exists(checkpoint_path):
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if json.dumps(ckpt.get("meta"), sort_keys=True) != json.dumps(meta, sort_keys=True):
            raise ValueError(
                f"checkpoint {checkpoint_path} was written for a different configuration; "
                "delete it (or pass --fresh) to start over"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if on_step is not None and hasattr(on_step, "load_state_dict") and "hook" in ckpt:
            on_step.load_state_dict(ckpt["hook"])
        step = int(ckpt["step"])
        result = TrainResult(**ckpt["result"])
        result.resumed_from = step
        if step < cfg.steps:
            log(f"resuming training from step {step}/{cfg.steps} ({checkpoint_path})")

    ctx = model.config.context_length if batch_fn is None else None
    bar = None
    if progress and cfg.progress(step, result.train_seconds) < 1.0:
        from tqdm import tqdm

        if cfg.max_seconds:  # time budget: the bar counts training seconds
            bar = tqdm(total=round(cfg.max_seconds), initial=min(round(cfg.max_seconds), int(result.train_seconds)),
                       desc="train", unit="s", dynamic_ncols=True)
        else:
            bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    model.train()
    last_ckpt_time = time.perf_counter()
    chunk: list[float] = []
    t_start = time.perf_counter()
    base_seconds = result.train_seconds
    dirty = False
    try:
        while cfg.progress(step, result.train_seconds) < 1.0:
            if batch_fn is None:
                x, y = get_batch(tokens, cfg.batch_size, ctx, cfg.seed, step)
            else:
                x, y = batch_fn(step)
            lr = cfg.lr_at(step, result.train_seconds)
            for g in optimizer.param_groups:
                g["lr"] = lr
            token_losses = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                if loss_fn is None:
                    logits, loss = model(x, y)
                    if on_step is not None:  # the same logits: recording leaves the update unchanged
                        token_losses = F.cross_entropy(
                            logits.detach().float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                            ignore_index=-100, reduction="none").view(y.shape)
                else:
                    per_token = loss_fn(model, x, y)
                    loss = per_token.sum() / (y != -100).sum().clamp_min(1)
                    token_losses = per_token.detach().float()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            dirty = True  # parameters change in place from here until `step` is advanced
            optimizer.step()
            if on_step is not None:
                on_step(StepRecord(step=step, inputs=x, targets=y, token_losses=token_losses, lr=lr))
            step += 1
            result.tokens_seen += int(y.numel())
            dirty = False
            chunk.append(float(loss.detach()))
            result.train_seconds = base_seconds + time.perf_counter() - t_start
            if bar is not None:
                bar.update(min(bar.total, int(result.train_seconds)) - bar.n if cfg.max_seconds else 1)
                bar.set_postfix(step=step, loss=f"{chunk[-1]:.3f}")
            finished = cfg.progress(step, result.train_seconds) >= 1.0
            if len(chunk) == 10 or finished:
                result.losses_nats.append(float(np.mean(chunk)))
                chunk = []
            due = step % cfg.checkpoint_every == 0 or time.perf_counter() - last_ckpt_time > cfg.checkpoint_seconds
            if checkpoint_path and (due or finished):
                _save_checkpoint(checkpoint_path, model, optimizer, step, result, meta, on_step)
                last_ckpt_time = time.perf_counter()
    except KeyboardInterrupt:
        if checkpoint_path and not dirty:
            # The model/optimizer hold the state after the last completed step.
            _save_checkpoint(checkpoint_path, model, optimizer, step, result, meta, on_step)
        if checkpoint_path:
            log(f"\ninterrupted; checkpoint kept in {checkpoint_path} — rerun the same command to continue")
        raise
    finally:
        if bar is not None:
            bar.close()
    result.steps = step
    model.eval()
    return result
