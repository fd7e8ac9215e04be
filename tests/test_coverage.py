"""Monte-Carlo coverage of every bound (spec section 10).

Token streams come from a Markov chain over V symbols whose true next-token distribution P is
known; a finite class of H fixed, imperfect models Q_h (uniform prior: log2 H extra bits) is
fitted by ERM on the training stream, so the hypothesis is chosen after seeing the data. The
true average conditional risk R(h, a) = (1/m) sum_k sum_y P(y | x_{k-1}) l_{h,a}(y | x_{k-1}) is
computed exactly from the stream's transition counts; the s evaluated tokens are a uniform
sample with replacement (a multinomial draw from the counts). Each bound must hold in >= 95%
of the simulations minus a 3-sigma binomial margin. Average slack (bound - truth) is printed.

A deliberately broken bound (no sampling term, a tenth of the complexity term) must FAIL the
same check: the harness has the power to catch an invalid bound.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from tokenbounds import bounds as B

V = 8
H = 4
ALPHAS = (0.01, 0.05, 0.2, 0.5)
DELTA = 0.05
PRIOR_BITS = math.log2(H)  # uniform prior over the H models: coded_bits = 0, extra_bits = 2


def _world(seed: int = 0):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(V, 0.4), size=V)  # true transitions P[prev, next]
    q = []
    for h in range(H):  # imperfect models: tempered + noisy versions of P
        noise = rng.dirichlet(np.full(V, 1.0), size=V)
        qh = (0.6 + 0.1 * h) * p ** (0.7 + 0.2 * h) + (0.4 - 0.1 * h) * noise
        q.append(qh / qh.sum(1, keepdims=True))
    q = np.stack(q)  # [H, V, V]
    a = np.asarray(ALPHAS)[None, :, None, None]
    loss = -np.log2((1 - a) * q[:, None] + a / V)  # [H, A, prev, next] bits
    cond_risk = (p[None, None] * loss).sum(-1)  # [H, A, prev]
    # top-1 error: the target is not the model's argmax (ties are measure-zero here)
    err = (q.argmax(-1)[:, :, None] != np.arange(V)[None, None, :]).astype(float)  # [H, prev, y]
    cond_err = (p[None] * err).sum(-1)  # [H, prev]
    evals, evecs = np.linalg.eig(p.T)
    pi = np.real(evecs[:, np.argmin(np.abs(evals - 1))])
    return p, loss, cond_risk, err, cond_err, pi / pi.sum()


def _chains(rng, p, start, n_chains: int, length: int) -> np.ndarray:
    """[n_chains, length + 1] symbols of the Markov chain, vectorised over chains."""
    cum = np.cumsum(p, axis=1)
    x = np.empty((n_chains, length + 1), dtype=np.int64)
    x[:, 0] = rng.choice(V, size=n_chains, p=start)
    for t in range(length):
        u = rng.random(n_chains)
        x[:, t + 1] = np.minimum((u[:, None] > cum[x[:, t]]).sum(1), V - 1)
    return x


def _transition_counts(rng, p, start, n_chains: int, length: int) -> np.ndarray:
    """[n_chains, V*V] transition counts of Markov chains of `length` transitions."""
    cum = np.cumsum(p, axis=1)
    counts = np.zeros((n_chains, V * V))
    rows = np.arange(n_chains)
    x = rng.choice(V, size=n_chains, p=start)
    for _ in range(length):
        nxt = np.minimum((rng.random(n_chains)[:, None] > cum[x]).sum(1), V - 1)
        counts[rows, x * V + nxt] += 1.0
        x = nxt
    return counts


def simulate_tokens(n_sims: int, m: int, s: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Per simulation: the ERM model's full-stream and sampled statistics and the true risks."""
    p, loss, cond_risk, err, cond_err, pi = _world()
    rng = np.random.default_rng(seed)
    counts = _transition_counts(rng, p, pi, n_sims, m)
    lflat = loss.reshape(H, len(ALPHAS), V * V)
    full_mean = counts @ lflat.reshape(-1, V * V).T / m  # [sims, H*A]
    full_mean = full_mean.reshape(n_sims, H, len(ALPHAS))
    h_star = full_mean[:, :, 1].argmin(1)  # ERM at a = 0.05 on the training stream
    sample = rng.multinomial(s, counts / m)  # s draws with replacement from the m tokens
    lh = lflat[h_star]  # [sims, A, V*V]
    s_mean = np.einsum("nc,nac->na", sample, lh) / s
    s_sq = np.einsum("nc,nac->na", sample, lh**2)
    s_var = (s_sq - s * s_mean**2) / (s - 1)
    f_sq = np.einsum("nc,nac->na", counts, lh**2)
    f_mean = full_mean[np.arange(n_sims), h_star]
    f_var = (f_sq - m * f_mean**2) / (m - 1)
    prev_counts = counts.reshape(n_sims, V, V).sum(2)  # [sims, prev]
    risk = np.einsum("np,nap->na", prev_counts, cond_risk[h_star]) / m
    eflat = err.reshape(H, V * V)[h_star]
    s_err = (sample * eflat).sum(1) / s
    risk_err = (prev_counts * cond_err[h_star]).sum(1) / m
    return {"s_mean": s_mean, "s_var": np.maximum(s_var, 0.0), "f_mean": f_mean,
            "f_var": np.maximum(f_var, 0.0), "risk": risk, "s_err": s_err, "risk_err": risk_err}


def simulate_documents(n_sims: int, n_docs: int, doc_len: int, s_docs: int, seed: int = 2):
    """i.i.d. documents (chains of doc_len tokens from a fixed start); per-document average
    losses of the ERM model and the true expected per-document loss."""
    p, loss, cond_risk, *_ = _world()
    rng = np.random.default_rng(seed)
    start = np.full(V, 1.0 / V)
    x = _chains(rng, p, start, n_sims * n_docs, doc_len).reshape(n_sims, n_docs, doc_len + 1)
    doc = np.zeros((H, len(ALPHAS), n_sims, n_docs))
    for t in range(doc_len):
        doc += loss[:, :, x[:, :, t], x[:, :, t + 1]]
    doc /= doc_len
    # true risk: distribution of the previous token at each step, from the start distribution
    dist, risk_hat = start.copy(), np.zeros((H, len(ALPHAS)))
    for _ in range(doc_len):
        risk_hat += cond_risk @ dist
        dist = dist @ p
    risk_hat /= doc_len
    full = doc.mean(-1)  # [H, A, sims]
    h_star = full[:, 1].argmin(0)
    idx = rng.integers(0, n_docs, size=(n_sims, s_docs))
    chosen = doc[h_star, :, np.arange(n_sims)]  # [sims, A, docs]
    samp = np.take_along_axis(chosen, idx[:, None, :], axis=2)
    return {"s_mean": samp.mean(2), "s_var": samp.var(2, ddof=1), "f_mean": full[h_star, :, np.arange(n_sims)],
            "risk": risk_hat[h_star]}


def _check(name: str, bound: np.ndarray, truth: np.ndarray, expect_valid: bool = True) -> float:
    n = bound.size
    coverage = float(np.mean(bound >= truth))
    slack = float(np.mean(bound - truth))
    margin = 3.0 * math.sqrt((1 - DELTA) * DELTA / n)
    print(f"{name:<46} n={n:<6} coverage={coverage:.4f} mean slack={slack:.4f}")
    if expect_valid:
        assert coverage >= 1 - DELTA - margin, f"{name}: coverage {coverage:.4f} over {n} runs"
    return coverage


def _stats(sim, i: int, full: bool = False) -> tuple[dict[float, float], dict[float, float]]:
    mean = sim["f_mean" if full else "s_mean"][i]
    var = sim["f_var" if full else "s_var"][i]
    return ({a: float(v) for a, v in zip(ALPHAS, mean, strict=True)},
            {a: float(v) for a, v in zip(ALPHAS, var, strict=True)})


def _token_variants(sim, m: int, s: int, n: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    kw = dict(coded_bits=0.0, extra_bits=PRIOR_BITS, train_tokens=m, vocab_size=V, delta=DELTA)

    def tok(i, **extra):
        emp, var = _stats(sim, i)
        return B.token_bound(emp, variance_bits=var, sample_tokens=s, **kw, **extra)

    def fre(i, full=False, **extra):
        emp, var = _stats(sim, i, full)
        return B.freedman_bound(emp, variance_bits=var, sample_tokens=None if full else s,
                                **kw, **extra)

    variants = {
        "token union hoeffding": lambda i: tok(i),
        "token union bernstein": lambda i: tok(i, sampling="bernstein"),
        "token lotfi-code hoeffding": lambda i: tok(i, alpha_cost="lotfi-code"),
        "token lotfi-code bernstein": lambda i: tok(i, alpha_cost="lotfi-code", sampling="bernstein"),
        "freedman union hoeffding": lambda i: fre(i),
        "freedman union bernstein": lambda i: fre(i, sampling="bernstein"),
        "freedman sampled, constant center": lambda i: fre(i, center=2.5),
        "freedman full pass, grid center": lambda i: fre(i, full=True),
        "freedman full pass, constant center": lambda i: fre(i, full=True, center=2.5),
    }
    a_index = {a: j for j, a in enumerate(ALPHAS)}
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, fn in variants.items():
        bnd, truth = np.empty(n), np.empty(n)
        for i in range(n):
            r = fn(i)
            bnd[i] = r.bound_bits
            truth[i] = sim["risk"][i, a_index[r.alpha]]
        out[name] = (bnd, truth)
    for kind in ("hoeffding", "bernstein"):
        bnd = np.array([B.topk_bound(sim["s_err"][i], coded_bits=0.0, extra_bits=PRIOR_BITS,
                                     train_tokens=m, sample_tokens=s, delta=DELTA,
                                     sampling=kind).bound for i in range(n)])
        out[f"top-1 error {kind}"] = (bnd, sim["risk_err"])
    return out


def run_token_coverage(n: int, m: int, s: int, seed: int = 1) -> dict[str, float]:
    print(f"\ntoken streams: {n} simulations, m = {m}, s = {s}, V = {V}, H = {H}, delta = {DELTA}")
    sim = simulate_tokens(n, m, s, seed)
    return {name: _check(name, bnd, truth)
            for name, (bnd, truth) in _token_variants(sim, m, s, n).items()}


def run_document_coverage(n: int, n_docs: int = 200, doc_len: int = 8, s_docs: int = 50,
                          seed: int = 2) -> None:
    print(f"\ndocuments: {n} simulations, {n_docs} i.i.d. documents of {doc_len} tokens, "
          f"{s_docs} sampled")
    sim = simulate_documents(n, n_docs, doc_len, s_docs, seed)
    a_index = {a: j for j, a in enumerate(ALPHAS)}
    kw = dict(coded_bits=0.0, extra_bits=PRIOR_BITS, train_documents=n_docs, vocab_size=V,
              delta=DELTA)
    for kind in ("hoeffding", "bernstein"):
        bnd, truth = np.empty(n), np.empty(n)
        for i in range(n):
            emp, var = _stats(sim | {"f_var": sim["s_var"]}, i)
            r = B.document_bound(emp, variance_bits=var, sample_documents=s_docs,
                                 sampling=kind, **kw)
            bnd[i], truth[i] = r.bound_bits, sim["risk"][i, a_index[r.alpha]]
        _check(f"document union {kind}", bnd, truth)
    j = a_index[0.05]  # the classic and MI bounds use one smoothing level fixed in advance
    pc = np.array([B.parameter_count_bound(sim["f_mean"][i, j], num_parameters=1,
                                           bits_per_parameter=PRIOR_BITS, train_documents=n_docs,
                                           vocab_size=V, alpha=0.05, delta=DELTA).bound
                   for i in range(n)])
    _check("parameter-count (2 bits = 4 models)", pc, sim["risk"][:, j])
    mi = B.mutual_information_bound(0.0, coded_bits=0.0, extra_bits=PRIOR_BITS,
                                    train_points=n_docs, vocab_size=V, alpha=0.05).bound
    gap = sim["risk"][:, j] - sim["f_mean"][:, j]
    se = gap.std(ddof=1) / math.sqrt(n)
    print(f"{'mutual-information (expectation)':<46} mean gap={gap.mean():.4f} +- {se:.4f} "
          f"bound={mi:.4f}")
    assert gap.mean() - 3 * se <= mi


def test_token_coverage_complexity_dominated():
    run_token_coverage(1000, m=2000, s=500)


def test_token_coverage_sampling_dominated():
    run_token_coverage(1000, m=10000, s=100, seed=3)


def test_document_coverage():
    run_document_coverage(1000)


def test_harness_detects_invalid_bounds():
    """Two wrong bounds must fail the check: the token bound without its sampling term (when
    sampling dominates), and the full-pass Freedman bound with the variance term removed."""
    n, m, s = 1000, 10000, 100
    sim = simulate_tokens(n, m, s, seed=3)
    a_index = {a: j for j, a in enumerate(ALPHAS)}
    kw = dict(coded_bits=0.0, extra_bits=PRIOR_BITS, train_tokens=m, vocab_size=V, delta=DELTA)
    no_samp, no_var = np.empty((n, 2)), np.empty((n, 2))
    for i in range(n):
        emp, var = _stats(sim, i)
        r = B.token_bound(emp, sample_tokens=s, **kw)
        no_samp[i] = r.bound_bits - r.sampling_bits, sim["risk"][i, a_index[r.alpha]]
        emp, var = _stats(sim, i, full=True)
        f = B.freedman_bound(emp, variance_bits=var, sample_tokens=None, **kw)
        k_center = 256
        gap0, _ = B.freedman_gap(f.log_prior_nats + math.log(k_center), m, 0.0, f.loss_range_bits,
                                 f.delta_split["freedman"])
        no_var[i] = f.empirical_bits + gap0, sim["risk"][i, a_index[f.alpha]]
    assert _check("BROKEN token bound without sampling term", *no_samp.T, expect_valid=False) < 0.9
    assert _check("BROKEN Freedman without variance term", *no_var.T, expect_valid=False) < 0.9


@pytest.mark.slow
def test_coverage_large():
    run_token_coverage(10000, m=2000, s=500, seed=11)
    run_token_coverage(10000, m=10000, s=100, seed=12)
    run_document_coverage(10000, seed=13)
