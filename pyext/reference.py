"""Slow float64 pure-torch oracles, one per kernel. Every backend is tested against these.

Other kernel families add their oracles here (hadamard, quantizers, gram / probe products), and
the GPT forward with each position encoding (gpt_forward_reference).
"""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


def smoothing_constants_reference(alphas, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log(1 - a) and log(a / V) (-inf at a = 0) in float64 (CPU), the oracle's own computation."""
    a = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1).cpu()
    log_keep = torch.log1p(-a)
    log_floor = torch.where(a > 0, torch.log(a) - math.log(vocab_size), torch.full_like(a, -math.inf))
    return log_keep, log_floor


def smoothed_nll_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alphas: torch.Tensor,
    vocab_size: int,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Oracle for tokenbounds::smoothed_nll on 2-D logits [N, V_padded] and targets [N].

    Returns (nll_bits [N, A] float32, logp [N] float32, rank [N] int32), computed in float64:
    log p_y = x_y - logsumexp(x[:V]); nll_a = -log2((1 - a) p_y + a / V) evaluated as
    -logaddexp(log(1 - a) + log p_y, log(a / V)) / ln 2 (Lotfi et al. 2024, prediction smoothing);
    rank = #{j < V : x_j > x_y}.
    """
    x = logits[:, :vocab_size].to(torch.float64)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    target_logit = x.gather(1, safe_targets[:, None])[:, 0] if x.shape[0] else x.new_zeros(0)
    lse = torch.logsumexp(x, dim=-1) if x.shape[0] else x.new_zeros(0)
    logp = torch.where(torch.isneginf(target_logit), torch.full_like(lse, -math.inf), target_logit - lse)
    # No valid softmax: a NaN or +inf logit, or no finite logit at all -> NaN (an input error).
    bad_row = torch.isnan(x).any(-1) | torch.isposinf(x).any(-1) | torch.isneginf(lse)
    logp = torch.where(bad_row, torch.full_like(logp, math.nan), logp)
    rank = (x > target_logit[:, None]).sum(-1)
    log_keep, log_floor = (c.to(x.device) for c in smoothing_constants_reference(alphas, vocab_size))
    nll = -torch.logaddexp(log_keep[None, :] + logp[:, None], log_floor[None, :].expand(len(logp), -1)) / LN2
    zero = torch.zeros((), dtype=torch.float64)
    nll = torch.where(valid[:, None], nll, zero)
    logp = torch.where(valid, logp, zero)
    rank = torch.where(valid, rank, torch.zeros_like(rank))
    return nll.to(torch.float32), logp.to(torch.float32), rank.to(torch.int32)


def linear_smoothed_nll_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    alphas: torch.Tensor,
    vocab_size: int,
    ignore_index: int,
    max_bytes: int = 64 * 2**20,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Oracle for tokenbounds::linear_smoothed_nll: :func:`smoothed_nll_reference` of the float64
    logits hidden @ weight[:V].T (+ bias[:V]), in row chunks of at most ``max_bytes`` of logits."""
    n = hidden.shape[0]
    w = weight[:vocab_size].to(torch.float64)
    b = bias[:vocab_size].to(torch.float64) if bias is not None else None
    rows = max(1, max_bytes // (8 * vocab_size))
    outs = []
    for start in range(0, n, rows):
        logits = hidden[start:start + rows].to(torch.float64) @ w.T
        if b is not None:
            logits = logits + b
        outs.append(smoothed_nll_reference(logits, targets[start:start + rows], alphas, vocab_size, ignore_index))
    if not outs:
        return smoothed_nll_reference(hidden.new_zeros((0, vocab_size), dtype=torch.float64), targets,
                                      alphas, vocab_size, ignore_index)
    return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))


# ==================================================================== hadamard / quant (issue 4)
# Oracles for tokenbounds::hadamard_transform and the quantizer codebooks (tokenbounds.quant).


def hadamard_transform_reference(x: torch.Tensor, hk: torch.Tensor, scale: float) -> torch.Tensor:
    """Oracle for tokenbounds::hadamard_transform on 2-D x [rows, n]: y = scale * x @ H_n^T.

    H_n = H_K (x) H_m with H_K = ``hk`` [K, K] and H_m the Sylvester matrix of order m = n / K
    (entry (-1)^popcount(i & j)); dense float64 matmul, result cast back to x.dtype.
    """
    n = x.shape[-1]
    k = hk.shape[0]
    m = n // k
    i = torch.arange(m)
    bits = i[:, None] & i[None, :]
    pop = torch.zeros_like(bits)
    while bool(bits.any()):
        pop += bits & 1
        bits = bits >> 1
    hm = (1 - 2 * (pop & 1)).to(torch.float64)
    h = torch.kron(hk.to(torch.float64).cpu(), hm).to(x.device)
    return (scale * (x.to(torch.float64) @ h.T)).to(x.dtype)


def e8_nearest_reference(x: torch.Tensor) -> torch.Tensor:
    """Brute-force nearest point of the E8 lattice to each row of x [N, 8] (float64 result).

    E8 = D8 U (D8 + 1/2), D8 = {z in Z^8 : sum z even}. Searches every candidate of both cosets
    whose coordinates are within 1 of x (floor/ceil per coordinate: 2^8 per coset), keeping those
    in the lattice, and returns the closest one.
    """
    x = x.to(torch.float64)
    best = torch.empty_like(x)
    corners = torch.tensor([[(c >> j) & 1 for j in range(8)] for c in range(256)], dtype=torch.float64)
    best_d = torch.full((x.shape[0],), float("inf"), dtype=torch.float64)
    for shift in (0.0, 0.5):
        base = torch.floor(x - shift)
        cand = base[:, None, :] + corners[None] + shift  # [N, 256, 8]
        in_lattice = torch.remainder(torch.round((cand - shift).sum(-1)), 2) == 0
        d = ((cand - x[:, None, :]) ** 2).sum(-1)
        d = torch.where(in_lattice, d, torch.full_like(d, float("inf")))
        dmin, arg = d.min(1)
        better = dmin < best_d
        best[better] = cand[better, arg[better]]
        best_d = torch.where(better, dmin, best_d)
    return best


# =============================================================================================
# gram family + Hessian oracles (owner: tokenbounds.hessian; issue 5). Independent numpy/float64
# implementations of csrc/include/tokenbounds/gram.h and csrc/cpu/gram.cpp.
# =============================================================================================


def mix32_int(x: int) -> int:
    """lowbias32 integer mixer on one Python int (C. Wellons); mirrors tokenbounds::gram::mix32."""
    m = 0xFFFFFFFF
    x &= m
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def _mix32_np(x):
    import numpy as np

    x = x.astype(np.uint32)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x7FEB352D)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x846CA68B)
        x ^= x >> np.uint32(16)
    return x


def rademacher_probes_reference(d: int, k: int, seed: int, offset: int) -> torch.Tensor:
    """Oracle for tokenbounds::rademacher_probes: Z[i, c] = 1 - 2 * top_bit(hash(seed, i, offset + c)).

    hash: row_key = mix(lo ^ 0x9E3779B9), col_key = mix(((hi + 0x85EBCA6B) mod 2^32) ^ row_key),
    h = mix(mix(mix(i ^ row_key) ^ col ^ col_key) + 0x632BE5AB) with mix = lowbias32.
    """
    import numpy as np

    lo, hi = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    row_key = mix32_int(lo ^ 0x9E3779B9)
    col_key = mix32_int(((hi + 0x85EBCA6B) & 0xFFFFFFFF) ^ row_key)
    rows = np.arange(d, dtype=np.uint64).astype(np.uint32)
    cols = (np.arange(offset, offset + k, dtype=np.uint64) & 0xFFFFFFFF).astype(np.uint32)
    rs = _mix32_np(rows ^ np.uint32(row_key))
    h = _mix32_np(rs[:, None] ^ cols[None, :] ^ np.uint32(col_key))
    with np.errstate(over="ignore"):
        h = _mix32_np(h + np.uint32(0x632BE5AB))
    return torch.from_numpy(np.where(h >> np.uint32(31), -1.0, 1.0).astype(np.float64))


def rademacher_matmul_reference(x: torch.Tensor, k: int, seed: int, offset: int) -> torch.Tensor:
    """Oracle for tokenbounds::rademacher_matmul: x @ Z in float64, cast to float32 (float64 for f64 x)."""
    z = rademacher_probes_reference(x.shape[1], k, seed, offset).to(x.device)
    out = x.to(torch.float64) @ z
    return out if x.dtype == torch.float64 else out.to(torch.float32)


def gram_accumulate_reference(acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Oracle for tokenbounds::gram_accumulate_: acc + triu(x^T x) in float64 (lower part unchanged)."""
    x64 = x.to(torch.float64)
    return acc.to(torch.float64) + torch.triu(x64.T @ x64)


def exact_hessian_reference(loss_fn, params: torch.Tensor) -> torch.Tensor:
    """Dense Hessian of a scalar function of one flat float64 parameter vector.

    Reverse-over-reverse (torch.func.jacrev of grad). torch.func.hessian (forward-over-reverse via
    jacfwd) returned entries off by ~4% for the tokenbounds GPT on torch 2.13 CPU, while this and
    central finite differences agree to 1e-9 (tests/test_hessian.py checks the oracle by finite
    differences).
    """
    return torch.func.jacrev(torch.func.grad(loss_fn))(params.detach().to(torch.float64))


def spectral_trace_reference(matrix: torch.Tensor, f: str) -> float:
    """tr f(H) from eigvalsh in float64; f in identity, sqrt_abs, sqrt_clamped, log (log of |lambda|)."""
    lam = torch.linalg.eigvalsh(matrix.to(torch.float64))
    fn = {
        "identity": lambda v: v,
        "sqrt_abs": lambda v: v.abs().sqrt(),
        "sqrt_clamped": lambda v: v.clamp_min(0).sqrt(),
        "log": lambda v: v.abs().log(),
    }[f]
    return float(fn(lam).sum())


def gpt_forward_reference(state_dict: dict, config, idx: torch.Tensor) -> torch.Tensor:
    """Oracle for tokenbounds.models.gpt.GPT: logits [B, T, V] in float64, written from the
    formulas with explicit loops over heads and no torch.nn module.

    ``config`` is a GPTConfig or a dict with its fields. Pre-LayerNorm blocks (eps 1e-5), exact
    erf GELU, attention softmax(q k^T / sqrt(d_h) + bias) over j <= i with the position
    encoding applied by its definition:
    * learned: x_p = E[token_p] + P[p];
    * rope (Su et al. 2021, eq. 13-15): q_p -> R_p q_p, k_p -> R_p k_p with R_p the block
      rotation that turns dimensions (j, j + d_h/2) by p * 10000^(-2j/d_h);
    * alibi (Press et al. 2022, section 3): bias -m_h (i - j), m_h = 2^(-8h/n) for n heads a power
      of two, else the n' = 2^floor(log2 n) slopes and the first n - n' odd-indexed slopes of 2n';
    * none: no bias, no embedding.
    """
    cfg = config if isinstance(config, dict) else {
        k: getattr(config, k) for k in ("n_layer", "n_head", "d_model", "position_encoding")}
    enc = cfg.get("position_encoding", "learned")
    n_head, d = int(cfg["n_head"]), int(cfg["d_model"])
    dh = d // n_head
    w = {k: v.detach().to(torch.float64).cpu() for k, v in state_dict.items()}
    idx = idx.cpu()
    b, t = idx.shape

    def layer_norm(x, name):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * w[name + ".weight"] + w[name + ".bias"]

    def linear(x, name):
        out = x @ w[name + ".weight"].T
        return out + w[name + ".bias"] if name + ".bias" in w else out

    x = w["tok_emb.weight"][idx]
    if enc == "learned":
        x = x + w["pos_emb.weight"][torch.arange(t)][None]

    rot = None
    if enc == "rope":  # rot[p] is the d_h x d_h rotation R_p
        half = dh // 2
        rot = torch.zeros(t, dh, dh, dtype=torch.float64)
        for p in range(t):
            for j in range(half):
                a = p * 10000.0 ** (-2.0 * j / dh)
                c, s = math.cos(a), math.sin(a)
                rot[p, j, j], rot[p, j, j + half] = c, -s
                rot[p, j + half, j], rot[p, j + half, j + half] = s, c
    slopes = None
    if enc == "alibi":
        def geometric(n):
            start = 2.0 ** (-8.0 / n)
            return [start ** h for h in range(1, n + 1)]
        n_pow = 2 ** int(math.floor(math.log2(n_head)))
        slopes = geometric(n_pow) + [geometric(2 * n_pow)[i] for i in range(0, 2 * n_pow, 2)][: n_head - n_pow]

    i_pos = torch.arange(t, dtype=torch.float64)[:, None]
    j_pos = torch.arange(t, dtype=torch.float64)[None, :]
    future = j_pos > i_pos
    for layer in range(int(cfg["n_layer"])):
        pre = f"blocks.{layer}."
        h = layer_norm(x, pre + "ln1")
        qkv = linear(h, pre + "attn.qkv")
        q_all, k_all, v_all = qkv[..., :d], qkv[..., d: 2 * d], qkv[..., 2 * d:]
        heads = []
        for hh in range(n_head):
            sl = slice(hh * dh, (hh + 1) * dh)
            q, k, v = q_all[..., sl], k_all[..., sl], v_all[..., sl]
            if rot is not None:
                q = torch.einsum("pij,bpj->bpi", rot, q)
                k = torch.einsum("pij,bpj->bpi", rot, k)
            scores = q @ k.transpose(1, 2) / math.sqrt(dh)
            if slopes is not None:
                scores = scores - slopes[hh] * (i_pos - j_pos)
            scores = scores.masked_fill(future, float("-inf"))
            e = torch.exp(scores - scores.max(-1, keepdim=True).values)
            heads.append((e / e.sum(-1, keepdim=True)) @ v)
        x = x + linear(torch.cat(heads, -1), pre + "attn.proj")
        h = layer_norm(x, pre + "ln2")
        u = linear(h, pre + "mlp.0")
        x = x + linear(0.5 * u * (1.0 + torch.erf(u / math.sqrt(2.0))), pre + "mlp.2")
    x = layer_norm(x, "ln_f")
    head = w.get("lm_head.weight", w["tok_emb.weight"])
    return x @ head.T
