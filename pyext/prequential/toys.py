"""The toy tasks of Donoway et al. (arXiv 2601.04728, section 5), measured with the real pipeline.

Every toy runs :func:`tokenbounds.prequential.run_seed` (so :func:`tokenbounds.eval.train.train`
with the prequential recorder) on rows whose single scored token is the answer; EDL is in bits.

**Idealised learners (exact theory).** Random labels and the coupon collector are statements
about a learner that stores each example and nothing else; our GPT shares every parameter
between examples, so its one-pass EDL on these tasks is dominated by the drift of the shared
weights (measured: random labels at lr 3e-3 give EDL -1 +- 10 bits over 6 seeds, too noisy for
the negative controls to fail). These two toys therefore use :class:`LookupLM`, a table of
logits indexed by the input token (a bigram model with a zero-initialised table), trained by the
same AdamW loop. An example touches its own table row only, so:

* **random labels** (every row a fresh input token with a uniformly random label): the model
  memorises every training label (final training loss ~0 bits) yet predicts held-out rows at the
  uniform loss, and every row is coded at the uniform loss before it is trained on: EDL = 0;
* **coupon collector** (K concepts, concept c always answered by its own a_c, concepts drawn
  uniformly): a concept costs Delta = log2 V bits the first time it is seen and ~0 afterwards, so
  E[EDL] / (K Delta) = 1 - (1 + u) e^{-u}, u = n / K (spec section 8). Adam's momentum keeps
  moving a row for ~10 steps after its example, so a fact is learned within a few steps, not at
  once; the toy uses a large learning rate (3) to keep that delay to ~2 steps, which the tests
  allow for with 0.02 (in units of K Delta) beside 3 standard errors over seeds.

**Elicitation vs teaching (a pretrained GPT).** A "pretrained model holding latent skills" has to
exist before it can be elicited, and one trained on the offline corpora holds no skill that a
handful of examples can select cleanly (its skills - Bible vs Shakespeare register - are also
inferable from the context itself). So the pretrained model is our GPT trained on a synthetic
multi-skill mixture (:class:`SkillWorld`, :func:`pretrain_skill_model`): rows ``[task, a] ->
answer`` with M = 8 skills over S = 8 symbols, skill s answering ``pi_s(a)`` (a random
permutation). In pretraining the task token names the skill (``t_s``) or is the *unknown* token
``U``, whose answer comes from a random skill: the model learns every skill and, for ``U``, the
mixture over skills (~2.2 bits instead of log2 8 = 3, since permutations collide). 32 concept
tokens are in the vocabulary but never in pretraining. Then, from that same model and with the
same training algorithm (one row per step, AdamW, lr 3e-3, all parameters):

* **elicitation (hypothesis collapse)**: fine-tune on ``[U, a] -> pi_s*(a)``, one fixed skill.
  The data only have to say *which* skill; a Bayesian learner would need ~log2 M bits, this
  gradient learner spends ~50 bits over ~50 steps (Adam moves ``U``'s representation by ~lr per
  step), after which EDL(n) is flat: EDL per sample falls as 1/n from n ~ 64 on (below that it
  is the collapse transient), EDL per trained parameter ~1e-3 bits, and rank-1 LoRA suffices;
* **teaching (new facts)**: fine-tune on ``[U, c] -> answer_c`` for the 32 unseen concept tokens
  (concepts drawn uniformly; facts no skill computes): each fact must be written into the
  weights (the coupon collector on the GPT), so EDL per sample rises until the facts are learned
  (n ~ 4 K) and then falls, with ~7x the elicitation's EDL per parameter; rank-1 LoRA does not
  learn them.

Negative controls (``controls=True``): the same runs report what three wrong implementations would
give: scoring each batch *after* its update (``edl_after_update_bits``), the final model's loss
on its own training rows in place of L_test (``edl_train_loss_bits``) and the final model's
training losses in place of the prequential code (``edl_final_code_bits``). The tests assert
that the toy checks reject them (random labels and the coupon collector reject all three; the
elicitation / teaching shapes reject the last).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from .run import (
    IGNORE_INDEX,
    PreparedModel,
    PrequentialConfig,
    TensorRows,
    causal_lm_token_losses,
    run_seed,
    summarize,
)

__all__ = [
    "LookupLM",
    "SkillWorld",
    "coupon_collector",
    "decreasing",
    "elicitation",
    "per_seed",
    "pretrain_skill_model",
    "random_labels",
    "rise_then_fall",
    "teaching",
]

LN2 = math.log(2.0)


class LookupLM(torch.nn.Module):
    """A table of logits indexed by the input token, zero-initialised (uniform predictions):
    ``model(x)[b, t] = table[x[b, t]]``. Each example updates only its own row."""

    def __init__(self, vocab_in: int, vocab_out: int):
        super().__init__()
        self.table = torch.nn.Embedding(vocab_in, vocab_out)
        torch.nn.init.zeros_(self.table.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table(x)


def _rows(inputs: np.ndarray, answers: np.ndarray) -> TensorRows:
    """Rows scoring only the last position (its target is the answer)."""
    x = np.asarray(inputs, np.int64)
    if x.ndim == 1:
        x = x[:, None]
    y = np.full(x.shape, IGNORE_INDEX, np.int64)
    y[:, -1] = answers
    return TensorRows(torch.from_numpy(x), torch.from_numpy(y))


# ----------------------------------------------------------------------------- controls
class _Controls:
    """on_step hook computing the two wrong implementations' numbers beside the right one."""

    def __init__(self, grid: list[int]):
        self.grid = set(grid)
        self.model = None
        self.after_bits: list[float] = []
        self.seen: list[tuple[Any, Any]] = []
        self.train_loss: dict[int, float] = {}

    def __call__(self, rec) -> None:
        with torch.no_grad():
            tl = causal_lm_token_losses(self.model, rec.inputs, rec.targets)
        self.model.train()
        mask = rec.targets != IGNORE_INDEX
        self.after_bits.append(float(tl.double()[mask].sum()) / LN2)
        self.seen.append((rec.inputs, rec.targets))
        n = rec.step + 1
        if n in self.grid:
            x = torch.cat([s[0] for s in self.seen])
            y = torch.cat([s[1] for s in self.seen])
            with torch.no_grad():
                tl = causal_lm_token_losses(self.model, x, y)
            self.model.train()
            m = y != IGNORE_INDEX
            self.train_loss[n] = float(tl.double()[m].sum() / m.sum()) / LN2


CONTROL_KEYS = ("edl_after_update_bits", "edl_train_loss_bits", "edl_final_code_bits")
"""The wrong implementations the negative controls compute beside the right EDL: each batch scored
after its update; the final model's training loss in place of L_test; the final model's training
losses in place of the prequential code (MDL := sum_i l(theta_n; x_i))."""


def _run_toy(make_model, train_rows_of_seed, test_rows, cfg: PrequentialConfig, *, controls: bool,
             progress: bool = False) -> dict[str, Any]:
    seeds = []
    for seed in cfg.seeds:
        ctl = _Controls(list(cfg.prefix_steps or [])) if controls else None

        def prepared(s, _ctl=ctl):
            p = make_model(s)
            if _ctl is not None:
                _ctl.model = p.model
            return p

        res = run_seed(prepared, train_rows_of_seed(seed), test_rows, cfg, seed, progress=progress,
                       log=lambda *_: None, on_step=ctl)
        if ctl is not None:
            after = np.cumsum(ctl.after_bits)
            for p in res["prefixes"]:
                n = p["steps"]
                p["edl_after_update_bits"] = float(after[n - 1] - p["tokens"] * p["test_loss_bits"])
                p["edl_train_loss_bits"] = float(p["mdl_bits"] - p["tokens"] * ctl.train_loss[n])
                p["edl_final_code_bits"] = float(p["tokens"] * (ctl.train_loss[n] - p["test_loss_bits"]))
                p["train_loss_bits"] = ctl.train_loss[n]
        seeds.append(res)
    out = summarize(seeds, cfg)
    if controls:
        for k, row in enumerate(out["prefixes"]):
            for key in CONTROL_KEYS + ("train_loss_bits",):
                vals = np.array([s["prefixes"][k][key] for s in seeds])
                row[key] = float(vals.mean())
                row[key + "_se"] = float(vals.std(ddof=1) / math.sqrt(vals.size)) if vals.size > 1 else None
                if key.startswith("edl_"):
                    per = vals / row["rows"]
                    name = key.replace("_bits", "_per_sample")
                    row[name] = float(per.mean())
                    row[name + "_se"] = float(per.std(ddof=1) / math.sqrt(per.size)) if per.size > 1 else None
    return out


def _lookup_maker(vocab_in: int, vocab_out: int):
    def make(seed: int) -> PreparedModel:
        torch.manual_seed(seed)
        m = LookupLM(vocab_in, vocab_out)
        n = sum(p.numel() for p in m.parameters())
        return PreparedModel(m, n, n, {"model": f"LookupLM({vocab_in} x {vocab_out})"})

    return make


# ----------------------------------------------------------------------------- idealised toys
def random_labels(n: int = 256, vocab: int = 16, *, seeds: tuple[int, ...] = (0, 1, 2, 3), lr: float = 1.0,
                  test_rows: int = 256, controls: bool = False) -> dict[str, Any]:
    """Random labels: row i has its own input token (never seen again) and a uniform label in
    ``vocab`` classes; held-out rows are fresh tokens with fresh labels. EDL ~ 0."""
    vin = n + test_rows
    grid = sorted({max(1, n // 2**k) for k in range(4)})
    cfg = PrequentialConfig(lr=lr, batch_rows=1, seeds=seeds, shuffle=False, prefix_steps=tuple(grid),
                            grad_clip=0.0)
    test_r = np.random.default_rng([99, 1])
    test = _rows(np.arange(n, vin), test_r.integers(0, vocab, test_rows))

    def rows_of(seed):
        r = np.random.default_rng([seed, 2])
        return _rows(r.permutation(n), r.integers(0, vocab, n))

    out = _run_toy(_lookup_maker(vin, vocab), rows_of, test, cfg, controls=controls)
    out["toy"] = {"name": "random labels", "n": n, "classes": vocab, "uniform_bits": math.log2(vocab),
                  "learner": "LookupLM", "lr": lr}
    return out


def coupon_collector(K: int = 64, answers: int = 64, *, u_max: float = 8.0,  # noqa: N803 - K as in the paper
                     u_grid: tuple[float, ...] = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0),
                     seeds: tuple[int, ...] = (0, 1, 2, 3), lr: float = 3.0, controls: bool = False) -> dict[str, Any]:
    """Coupon collector: K concepts, each with a fixed random answer among ``answers``; rows draw
    concepts uniformly. Each prefix gets the theory ``1 - (1 + u) e^{-u}`` (u = n / K) and the
    measured ``edl_fraction = EDL / (K Delta)`` with Delta = log2 answers."""
    from ..bounds import coupon_collector_edl_fraction

    n = int(round(u_max * K))
    grid = sorted({max(1, int(round(u * K))) for u in u_grid if u <= u_max} | {n})
    cfg = PrequentialConfig(lr=lr, batch_rows=1, seeds=seeds, shuffle=False, prefix_steps=tuple(grid),
                            grad_clip=0.0)
    answer = np.random.default_rng([1234, K, answers]).integers(0, answers, K)
    test = _rows(np.arange(K), answer)  # every concept once: the exact population loss (uniform concepts)

    def rows_of(seed):
        c = np.random.default_rng([seed, 3]).integers(0, K, n)
        return _rows(c, answer[c])

    out = _run_toy(_lookup_maker(K, answers), rows_of, test, cfg, controls=controls)
    delta = math.log2(answers)
    for row in out["prefixes"]:
        u = row["steps"] / K
        row["u"] = u
        row["theory_fraction"] = coupon_collector_edl_fraction(u)
        for key in ("edl_bits",) + CONTROL_KEYS:
            if key in row:
                name = key.replace("edl", "fraction").replace("_bits", "")
                row[name] = row[key] / (K * delta)
                row[name + "_se"] = None if row.get(key + "_se") is None else row[key + "_se"] / (K * delta)
    out["toy"] = {"name": "coupon collector", "K": K, "answers": answers, "delta_bits": delta,
                  "learner": "LookupLM", "lr": lr}
    return out


# ----------------------------------------------------------------------------- skills
@dataclass(frozen=True)
class SkillWorld:
    """M skills over S symbols: skill s answers ``perms[s][a]``. Tokens: symbols 0..S-1, task
    tokens S..S+M-1, the unknown-task token U = S + M, then ``facts`` concept tokens that
    pretraining never shows (the teaching task's new facts: concept c is answered by its own
    random symbol). Rows ``[task, a, b]``, the answer scored."""

    symbols: int = 8
    skills: int = 8
    facts: int = 32
    seed: int = 0
    unknown_fraction: float = 0.25

    @property
    def vocab_size(self) -> int:
        return self.symbols + self.skills + 1 + self.facts

    @property
    def unknown(self) -> int:
        return self.symbols + self.skills

    @property
    def first_concept(self) -> int:
        return self.unknown + 1

    def perms(self) -> np.ndarray:
        g = np.random.default_rng([self.seed, 17])
        return np.stack([g.permutation(self.symbols) for _ in range(self.skills)])

    def fact_answers(self) -> np.ndarray:
        """The answer (a symbol) of each concept token: facts no skill computes."""
        return np.random.default_rng([self.seed, 29]).integers(0, self.symbols, self.facts)

    def pretraining_batch(self, step: int, batch: int):
        r = np.random.default_rng([self.seed, 41, step])
        s = r.integers(0, self.skills, batch)
        a = r.integers(0, self.symbols, batch)
        task = np.where(r.random(batch) < self.unknown_fraction, self.unknown, self.symbols + s)
        rows = _rows(np.stack([task, a], 1), self.perms()[s, a])
        return rows.inputs, rows.targets

    def mixture_loss_bits(self, skill: int) -> float:
        """Loss of the ideal mixture predictor on skill ``skill``'s answers (uniform a)."""
        p = self.perms()
        return float(np.mean([-math.log2((p[:, a] == p[skill, a]).sum() / self.skills)
                              for a in range(self.symbols)]))


@dataclass(frozen=True)
class PretrainConfig:
    n_layer: int = 1
    n_head: int = 4
    d_model: int = 64
    steps: int = 1000
    batch: int = 64
    lr: float = 1e-2
    seed: int = 0
    tie_embeddings: bool = False  # new concept tokens then start at their initialisation


def pretrain_skill_model(world: SkillWorld = SkillWorld(), cfg: PretrainConfig = PretrainConfig(), *,
                         cache_dir: str | None = None, progress: bool = False):
    """Our GPT trained on the skill mixture (see the module docstring); cached in ``cache_dir``
    (keyed by both configs) when given. Returns the model in eval mode."""
    from ..eval.train import TrainConfig, train
    from ..models.gpt import GPT, GPTConfig

    key = hashlib.sha256(json.dumps({"world": asdict(world), "pretrain": asdict(cfg)}, sort_keys=True)
                         .encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"skills-{key}") if cache_dir else None
    if path and os.path.exists(os.path.join(path, "model.pt")):
        return GPT.load(path).eval()
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(vocab_size=world.vocab_size, context_length=2, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, d_model=cfg.d_model,
                          tie_embeddings=cfg.tie_embeddings))
    tcfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch, lr=cfg.lr, warmup_steps=max(1, cfg.steps // 40),
                       seed=cfg.seed)
    train(model, None, tcfg, progress=progress, batch_fn=lambda s: world.pretraining_batch(s, cfg.batch),
          log=lambda *_: None)
    if path:
        model.save(path)
    return model.eval()


def _finetune_maker(pretrained, lora_rank: int | None):
    import copy

    def make(seed: int) -> PreparedModel:
        model = copy.deepcopy(pretrained)
        total = sum(p.numel() for p in model.parameters())
        desc: dict[str, Any] = {"model": "GPT pretrained on the skill mixture"}
        if lora_rank:
            from ..compress import apply_lora, trainable_parameters

            apply_lora(model, lora_rank, seed=seed)
            trained = trainable_parameters(model)
            desc["lora_rank"] = lora_rank
        else:
            model.requires_grad_(True)
            trained = total
        return PreparedModel(model, trained, total, desc)

    return make


def _skill_task(pretrained, world: SkillWorld, answers_of, *, n: int, grid: list[int], seeds, lr: float,
                lora_rank: int | None, controls: bool, name: str) -> dict[str, Any]:
    cfg = PrequentialConfig(lr=lr, batch_rows=1, seeds=tuple(seeds), shuffle=False, prefix_steps=tuple(grid))
    a_all = np.arange(world.symbols)
    test = _rows(np.stack([np.full(a_all.size, world.unknown), a_all], 1), answers_of(a_all))

    def rows_of(seed):
        a = np.random.default_rng([seed, 5]).integers(0, world.symbols, n)
        return _rows(np.stack([np.full(n, world.unknown), a], 1), answers_of(a))

    out = _run_toy(_finetune_maker(pretrained, lora_rank), rows_of, test, cfg, controls=controls)
    out["toy"] = {"name": name, "symbols": world.symbols, "skills": world.skills, "lr": lr,
                  "lora_rank": lora_rank, "learner": "GPT pretrained on the skill mixture"}
    return out


def elicitation(pretrained, world: SkillWorld = SkillWorld(), *, skill: int = 3, n: int = 1024, n_min: int = 1,
                seeds: tuple[int, ...] = (0, 1, 2, 3), lr: float = 3e-3, lora_rank: int | None = None,
                controls: bool = False) -> dict[str, Any]:
    """Hypothesis collapse: fine-tune on ``[U, a, b] -> pi_skill(a)``; prefixes n = n_min, 2 n_min,
    ..., n (rows; one row per step)."""
    perms = world.perms()
    grid = sorted({min(n, n_min * 2**k) for k in range(int(math.log2(n / n_min)) + 1)} | {n})
    out = _skill_task(pretrained, world, lambda a: perms[skill][a], n=n, grid=grid, seeds=seeds, lr=lr,
                      lora_rank=lora_rank, controls=controls, name="elicitation (hypothesis collapse)")
    out["toy"]["skill"] = skill
    out["toy"]["mixture_loss_bits"] = world.mixture_loss_bits(skill)
    return out


def teaching(pretrained, world: SkillWorld = SkillWorld(), *, u_max: float = 32.0,
             u_grid: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0), seeds: tuple[int, ...] = (0, 1, 2, 3),
             lr: float = 3e-3, lora_rank: int | None = None, controls: bool = False) -> dict[str, Any]:
    """Teaching: fine-tune on ``[U, c, b] -> answer_c`` for the K = ``world.facts`` concept tokens
    the pretrained model has never seen (concepts drawn uniformly, b a random distractor symbol);
    prefixes n = u K. Held-out rows: every concept with every b (the exact population loss)."""
    answers = world.fact_answers()
    k = world.facts
    n = int(round(u_max * k))
    grid = sorted({max(1, int(round(u * k))) for u in u_grid if u <= u_max} | {n})
    c0 = world.first_concept
    cfg = PrequentialConfig(lr=lr, batch_rows=1, seeds=tuple(seeds), shuffle=False, prefix_steps=tuple(grid))
    cc = np.arange(k)
    test = _rows(np.stack([np.full(k, world.unknown), c0 + cc], 1), answers)

    def rows_of(seed):
        c = np.random.default_rng([seed, 6]).integers(0, k, n)
        return _rows(np.stack([np.full(n, world.unknown), c0 + c], 1), answers[c])

    out = _run_toy(_finetune_maker(pretrained, lora_rank), rows_of, test, cfg, controls=controls)
    for row in out["prefixes"]:
        row["u"] = row["steps"] / k
    out["toy"] = {"name": "teaching (new facts)", "symbols": world.symbols, "skills": world.skills,
                  "facts": k, "lr": lr, "lora_rank": lora_rank, "learner": "GPT pretrained on the skill mixture"}
    return out


# ----------------------------------------------------------------------------- shape checks
def per_seed(summary: dict[str, Any], key: str = "edl_per_sample") -> np.ndarray:
    """[seeds, prefixes] array of ``key`` (``*_per_sample`` of a control is its ``*_bits`` / rows)."""
    rows = []
    for s in summary["per_seed"]:
        vals = []
        for p in s["prefixes"]:
            if key in p:
                vals.append(p[key])
            elif key.endswith("_per_sample") and key.replace("_per_sample", "_bits") in p:
                vals.append(p[key.replace("_per_sample", "_bits")] / p["rows"])
            else:
                raise KeyError(f"{key} is not recorded per seed (run the toy with controls=True)")
        rows.append(vals)
    return np.asarray(rows, np.float64)


def _paired_gap(v: np.ndarray, i: int, j: int, z: float) -> bool:
    """Mean of v[:, i] - v[:, j] over seeds exceeds z paired standard errors (and 0)."""
    d = v[:, i] - v[:, j]
    se = d.std(ddof=1) / math.sqrt(d.size) if d.size > 1 else 0.0
    return bool(d.mean() > z * se and d.mean() > 0)


def decreasing(summary: dict[str, Any], key: str = "edl_per_sample", *, z: float = 2.0) -> bool:
    """Every prefix's ``key`` lies below the previous one by more than ``z`` paired standard errors
    over seeds (paired: a seed's curve is compared with itself)."""
    v = per_seed(summary, key)
    return all(_paired_gap(v, k, k + 1, z) for k in range(v.shape[1] - 1))


def rise_then_fall(summary: dict[str, Any], key: str = "edl_per_sample", *, z: float = 2.0) -> bool:
    """The mean curve peaks at an interior prefix that exceeds both end points by more than ``z``
    paired standard errors over seeds."""
    v = per_seed(summary, key)
    k = int(np.argmax(v.mean(0)))
    if k in (0, v.shape[1] - 1):
        return False
    return _paired_gap(v, k, 0, z) and _paired_gap(v, k, v.shape[1] - 1, z)
