"""Synthetic length-generalization tasks (tokenbounds.length.tasks): each generator's ground truth
recomputed independently, determinism, errors; the position buckets (tokenbounds.length.buckets);
and a tiny train + score round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenbounds.length.buckets import bucket_edges, bucket_losses, bucket_position_totals
from tokenbounds.length.tasks import (
    BOS,
    PAD,
    SEP,
    TASKS,
    Addition,
    Copy,
    Parity,
    Retrieval,
    make_task,
)

SIZES = [1, 2, 5, 17, 40]


def rows(batch):
    """(sequence without padding, answer mask) per row; padding only ever at the end."""
    for tok, mask, n in zip(batch.tokens, batch.answer_mask, batch.sizes, strict=True):
        length = int(np.nonzero(tok != PAD)[0].max()) + 1
        assert (tok[length:] == PAD).all() and not mask[length:].any()
        yield tok[:length].tolist(), mask[:length].tolist(), int(n)


def test_copy_answers_repeat_the_input():
    task = Copy(num_symbols=7)
    batch = task.batch(SIZES * 4, seed=0)
    for seq, mask, n in rows(batch):
        assert len(seq) == task.sequence_length(n) == 2 * n + 2
        assert seq[0] == BOS and seq[n + 1] == SEP
        x = seq[1 : n + 1]
        assert all(3 <= s < 3 + 7 for s in x)
        assert seq[n + 2 :] == x  # the copy
        assert mask == [False] * (n + 2) + [True] * n
    assert batch.tokens.max() < task.vocab_size


def test_parity_answer_is_the_sum_of_the_bits_mod_two():
    task = Parity()
    batch = task.batch(SIZES * 10, seed=1)
    answers = []
    for seq, mask, n in rows(batch):
        assert len(seq) == n + 3 and seq[0] == BOS and seq[n + 1] == SEP
        bits = [s - 3 for s in seq[1 : n + 1]]
        assert set(bits) <= {0, 1}
        assert seq[-1] - 3 == sum(bits) % 2
        assert mask == [False] * (n + 2) + [True]
        answers.append(seq[-1])
    assert set(answers) == {3, 4}  # both answers occur


def test_addition_is_checked_with_python_ints():
    task = Addition()
    batch = task.batch(SIZES * 10, seed=2)
    carries = 0
    for seq, mask, n in rows(batch):
        assert len(seq) == 3 * n + 4
        assert seq[0] == BOS and seq[n + 1] == Addition.PLUS and seq[2 * n + 2] == Addition.EQUALS
        digits = [s - Addition.ZERO for s in seq]
        a_digits, b_digits, c_digits = digits[1 : n + 1], digits[n + 2 : 2 * n + 2], digits[2 * n + 3 :]
        assert len(c_digits) == n + 1 and all(0 <= d <= 9 for d in a_digits + b_digits + c_digits)
        # least significant digit first: reverse to read the numbers
        a = int("".join(map(str, reversed(a_digits))))
        b = int("".join(map(str, reversed(b_digits))))
        c = int("".join(map(str, reversed(c_digits))))
        assert a + b == c
        carries += c_digits[-1]
        assert mask == [False] * (2 * n + 3) + [True] * (n + 1)
    assert carries > 0  # the final carry digit is exercised


def test_retrieval_answer_is_the_token_after_the_key():
    task = Retrieval(num_values=5)
    batch = task.batch(SIZES * 10, seed=3)
    places = set()
    for seq, mask, n in rows(batch):
        assert len(seq) == task.sequence_length(n) == n + 5 and seq[0] == BOS
        haystack = seq[1 : n + 2]
        assert haystack.count(Retrieval.KEY) == 1  # the key occurs once, then the query
        j = haystack.index(Retrieval.KEY)
        values = [s for s in haystack if s != Retrieval.KEY]
        assert len(values) == n and all(4 <= v < 9 for v in values)
        assert seq[n + 2 :] == [SEP, Retrieval.KEY, haystack[j + 1]]
        assert mask == [False] * (n + 4) + [True]
        places.add((n, j))
    assert len({j for n, j in places if n == 40}) > 5  # the key's place varies


@pytest.mark.parametrize("name", sorted(TASKS))
def test_batches_are_deterministic_and_seed_dependent(name):
    task = make_task(name)
    a, b = task.batch([3, 7, 5], seed=11), task.batch([3, 7, 5], seed=11)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.answer_mask, b.answer_mask)
    assert np.array_equal(task.batch(5, seed=[4, 2], count=3).tokens, task.batch([5, 5, 5], seed=[4, 2]).tokens)
    c = task.batch([3, 7, 5], seed=12)
    assert not np.array_equal(a.tokens, c.tokens)
    x, y = a.inputs_targets()
    assert x.shape == y.shape == (3, a.tokens.shape[1] - 1) and x.dtype == torch.long
    assert int((y != -100).sum()) == int(a.answer_mask.sum())
    assert torch.equal(y[y != -100], torch.from_numpy(a.tokens[a.answer_mask]))
    assert [len(ans) for ans in a.answers] == a.answer_mask.sum(1).tolist()


def test_different_tasks_draw_different_streams():
    assert not np.array_equal(Copy(num_symbols=2).batch(8, seed=0, count=4).tokens[:, 1:9] - 3,
                              Parity().batch(8, seed=0, count=4).tokens[:, 1:9] - 3)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_bad_sizes_are_refused(name):
    task = make_task(name)
    with pytest.raises(ValueError, match="task size must be >= 1"):
        task.batch(0, seed=0)
    with pytest.raises(ValueError, match="task size must be >= 1"):
        task.batch([3, -1], seed=0)
    with pytest.raises(ValueError, match="must be integers"):
        task.batch(2.5, seed=0)
    with pytest.raises(ValueError, match="no sizes"):
        task.batch([], seed=0)


def test_bad_task_options_are_refused():
    with pytest.raises(ValueError, match="num_values >= 2"):
        Retrieval(num_values=1)
    with pytest.raises(ValueError, match="num_symbols >= 2"):
        Copy(num_symbols=1)
    with pytest.raises(ValueError, match="unknown task 'sort'"):
        make_task("sort")


# ----------------------------------------------------------------------------- position buckets
def test_bucket_populations_sum_to_m_and_split_at_the_training_length():
    rng = np.random.default_rng(0)
    L, T, m = 400, 100, 5000
    pos = rng.integers(1, L + 1, size=m)
    loss = rng.exponential(size=m)
    b = bucket_losses(pos, loss, L, context_length=T, num_buckets=12)
    assert b.m == m == int(b.counts.sum())
    assert b.edges[0] == 1 and b.edges[-1] == L + 1 and T + 1 in b.edges.tolist()
    assert np.all(np.diff(b.edges) > 0)
    # exact populations, sums and squares, recomputed bucket by bucket
    for k in range(len(b.counts)):
        inside = (pos >= b.edges[k]) & (pos < b.edges[k + 1])
        assert b.counts[k] == inside.sum()
        assert b.loss_sum_bits[k] == pytest.approx(loss[inside].sum(), rel=1e-12)
        assert b.loss_sq_sum_bits[k] == pytest.approx((loss[inside] ** 2).sum(), rel=1e-12)
        assert b.beyond_training[k] == (b.edges[k] > T)
        assert (b.edges[k + 1] - 1 <= T) or (b.edges[k] > T)  # no bucket straddles T
    assert b.beyond_training.any() and not b.beyond_training.all()
    d = b.to_dict()
    assert d["m"] == m and sum(d["counts"]) == m


def test_buckets_one_per_position_when_short_and_empty_buckets():
    b = bucket_losses(np.array([1, 1, 3]), np.array([1.0, 3.0, 5.0]), 4, context_length=2)
    assert b.edges.tolist() == [1, 2, 3, 4, 5] and b.counts.tolist() == [2, 0, 1, 0]
    assert b.mean_bits[0] == 2.0 and np.isnan(b.mean_bits[1])
    assert b.beyond_training.tolist() == [False, False, True, True]
    # per-position totals (an engine's accumulator) give the same buckets
    t = bucket_position_totals(np.array([2, 0, 1, 0]), np.array([4.0, 0, 5.0, 0]), np.array([10.0, 0, 25.0, 0]),
                               context_length=2)
    assert t.counts.tolist() == b.counts.tolist() and np.allclose(t.loss_sum_bits, b.loss_sum_bits)
    assert np.allclose(t.loss_sq_sum_bits, b.loss_sq_sum_bits)
    assert bucket_edges(1000).tolist() == bucket_edges(1000, context_length=2000).tolist()  # T >= L: no split
    # one column per smoothing level
    two = bucket_position_totals(np.array([2, 0, 1, 0]), np.array([[4.0, 1.0], [0, 0], [5.0, 2.0], [0, 0]]),
                                 context_length=2)
    assert two.loss_sum_bits.tolist() == [[4.0, 1.0], [0, 0], [5.0, 2.0], [0, 0]]
    assert two.mean_bits[0].tolist() == [2.0, 0.5] and np.isnan(two.mean_bits[1]).all()
    assert np.isnan(two.loss_sq_sum_bits).all() and two.to_dict()["mean_bits"][1] == [None, None]


def test_bucket_inputs_are_validated():
    with pytest.raises(ValueError, match="max_length must be an integer >= 1"):
        bucket_losses(np.array([1]), np.array([0.5]), 0)
    with pytest.raises(ValueError, match="max_length must be an integer >= 1"):
        bucket_edges(-3)
    with pytest.raises(ValueError, match="position 9 is outside 1..max_length=8"):
        bucket_losses(np.array([1, 9]), np.array([0.5, 0.5]), 8)
    with pytest.raises(ValueError, match="position 0 is outside"):
        bucket_losses(np.array([0]), np.array([0.5]), 8)
    with pytest.raises(ValueError, match="NaN or inf"):
        bucket_losses(np.array([1]), np.array([np.nan]), 8)
    with pytest.raises(ValueError, match="equal length"):
        bucket_losses(np.array([1, 2]), np.array([0.5]), 8)
    with pytest.raises(ValueError, match="context_length"):
        bucket_edges(8, context_length=0)
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        bucket_position_totals(np.array([], dtype=np.int64), np.array([]))


# ----------------------------------------------------------------------------- train and score
def test_tiny_model_learns_parity_of_short_inputs_and_is_scored_beyond_t():
    from tokenbounds.eval.train import TrainConfig
    from tokenbounds.length.train import answer_accuracy, train_on_task
    from tokenbounds.models.gpt import GPT, GPTConfig

    task = Parity()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=task.vocab_size, context_length=task.sequence_length(2) - 1,
                          n_layer=1, n_head=2, d_model=16, position_encoding="none"))
    before = answer_accuracy(model, task, 2, 200, seed=5)
    result = train_on_task(model, task, 2, TrainConfig(steps=150, batch_size=32, lr=1e-2, warmup_steps=10))
    after = answer_accuracy(model, task, 2, 200, seed=5)
    assert result.steps == 150 and result.losses_nats[-1] < result.losses_nats[0]
    assert after["token_accuracy"] > max(0.9, before["token_accuracy"])
    longer = answer_accuracy(model, task, 8, 64, seed=5)  # beyond the training length: runs
    assert longer["answer_tokens"] == 64 and 0 <= longer["token_accuracy"] <= 1
    with pytest.raises(ValueError, match="context_length is"):
        train_on_task(model, task, 5, TrainConfig(steps=1))


def test_sweep_caches_models_and_scores_learned_positions_at_t_only(tmp_path):
    from tokenbounds.length.experiment import SweepConfig, TaskSpec, markdown, plot, run_sweep

    cfg = SweepConfig(tasks=(TaskSpec("parity", 3, steps=4),), encodings=("learned", "alibi"), seeds=(0, 1),
                      n_layer=1, n_head=2, d_model=8, batch_size=8, warmup_steps=1, eval_examples=16)
    logs: list[str] = []
    first = run_sweep(cfg, str(tmp_path), progress=False, log=logs.append)
    assert [(r["encoding"], r["seed"], r["cached"]) for r in first["records"]] == [
        ("learned", 0, False), ("learned", 1, False), ("alibi", 0, False), ("alibi", 1, False)]
    learned = first["records"][0]["evals"]
    assert "token_accuracy" in learned[0] and all("learned absolute" in e["skipped"] for e in learned[1:])
    assert [e["size"] for e in first["records"][2]["evals"]] == [3, 6, 12]
    again = run_sweep(cfg, str(tmp_path), progress=False)
    assert all(r["cached"] for r in again["records"])
    for a, b in zip(first["records"], again["records"], strict=True):
        assert a["evals"] == b["evals"]  # a rerun only evaluates, and gets the same numbers
    table = markdown(again)
    assert "| parity (3) | learned |" in table and "n/a" in table and "(0." in table  # mean (min-max)
    assert plot(again, str(tmp_path / "acc.png")) and (tmp_path / "acc.png").stat().st_size > 1000
    # another configuration is another cache entry, never a silently reused model
    other = run_sweep(SweepConfig(**{**cfg.__dict__, "seeds": (0,), "lr": 1e-3}), str(tmp_path), progress=False)
    assert not other["records"][0]["cached"]
    with pytest.raises(ValueError, match="unknown position encodings"):
        SweepConfig(tasks=cfg.tasks, encodings=("sinusoidal",))
