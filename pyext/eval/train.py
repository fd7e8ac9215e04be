"""Train :class:`tokenbounds.models.gpt.GPT` on a token file: AdamW, warmup + cosine schedule,
bf16 autocast on CPU, a tqdm progress bar, and an atomic checkpoint so an interrupted run
(Ctrl-C, kill) resumes where it stopped and ends with the same model as an uninterrupted run.

Batches are windows of ``context_length + 1`` tokens at offsets drawn from
``numpy.random.default_rng([seed, step])``, so the batch of a step does not depend on whether
the run was resumed.
"""

from __future__ import annotations

import json
import math
import os
import time
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
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _save_checkpoint(path: str, model, optimizer, step: int, result: TrainResult, meta: dict) -> None:
    import torch

    tmp = path + ".tmp"
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
         "result": result.to_dict(), "meta": meta},
        tmp,
    )
    os.replace(tmp, path)


def train(
    model,
    tokens: np.ndarray,
    cfg: TrainConfig,
    *,
    checkpoint_path: str | None = None,
    progress: bool = True,
    meta: dict | None = None,
    log=print,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` steps on ``tokens``; resume from
    ``checkpoint_path`` when it exists and matches ``meta`` (a mismatch raises ValueError).

    On KeyboardInterrupt the checkpoint of the last completed step is written and the
    exception re-raised.
    """
    import torch

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
        step = int(ckpt["step"])
        result = TrainResult(**ckpt["result"])
        result.resumed_from = step
        if step < cfg.steps:
            log(f"resuming training from step {step}/{cfg.steps} ({checkpoint_path})")

    ctx = model.config.context_length
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
            x, y = get_batch(tokens, cfg.batch_size, ctx, cfg.seed, step)
            for g in optimizer.param_groups:
                g["lr"] = cfg.lr_at(step, result.train_seconds)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                _, loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            dirty = True  # parameters change in place from here until `step` is advanced
            optimizer.step()
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
                _save_checkpoint(checkpoint_path, model, optimizer, step, result, meta)
                last_ckpt_time = time.perf_counter()
    except KeyboardInterrupt:
        if checkpoint_path and not dirty:
            # The model/optimizer hold the state after the last completed step.
            _save_checkpoint(checkpoint_path, model, optimizer, step, result, meta)
        if checkpoint_path:
            log(f"\ninterrupted; checkpoint kept in {checkpoint_path} — rerun the same command to continue")
        raise
    finally:
        if bar is not None:
            bar.close()
    result.steps = step
    model.eval()
    return result
