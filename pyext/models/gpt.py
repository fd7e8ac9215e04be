"""A small GPT (pre-LayerNorm decoder-only transformer) that trains on 2 CPU cores.

Used by the demo, the tests and the scaling experiments. ``hidden_states`` returns the final
normalised hidden states so the LM head can be fused with the loss (``linear_smoothed_nll``).

Position encodings (``GPTConfig.position_encoding``), chosen at training:

* ``"learned"`` (default): a learned absolute embedding per position, added to the token
  embedding (GPT-2). Exists only for positions < ``context_length``, so longer inputs are refused.
* ``"rope"``: rotary embeddings (Su et al. 2021, arXiv 2104.09864): queries and keys are rotated
  pairwise by the angle ``p * base^(-2j/d_head)``, so q_i . k_j depends on positions only through
  i - j. Dimensions j and j + d_head/2 form the pairs (the GPT-NeoX layout).
* ``"alibi"``: attention linear biases (Press et al. 2022, arXiv 2108.12409): score(i, j) gets
  ``-m_h (i - j)`` with a fixed geometric slope m_h per head (:func:`alibi_slopes`); no embedding.
* ``"none"`` (NoPE, Kazemnejad et al. 2023, arXiv 2305.19466): no position information except
  what the causal mask implies.

The last three accept inputs longer than ``context_length`` (the training length).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

POSITION_ENCODINGS = ("learned", "rope", "alibi", "none")
ROPE_BASE = 10000.0


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    context_length: int = 256  # training length; the only length a "learned" model accepts
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.0
    tie_embeddings: bool = True
    position_encoding: str = "learned"  # one of POSITION_ENCODINGS

    def __post_init__(self) -> None:
        if self.position_encoding not in POSITION_ENCODINGS:
            raise ValueError(
                f"position_encoding={self.position_encoding!r} is not one of {POSITION_ENCODINGS}"
            )
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if self.position_encoding == "rope" and (self.d_model // self.n_head) % 2:
            raise ValueError(
                f"rope rotates pairs of dimensions, so the head dimension d_model/n_head = "
                f"{self.d_model // self.n_head} must be even; change d_model or n_head"
            )

    def to_dict(self) -> dict:
        """The fields as a dict, without ``position_encoding`` when it is the default "learned",
        so configs of learned-position models are written exactly as before the field existed."""
        out = asdict(self)
        if out["position_encoding"] == "learned":
            del out["position_encoding"]
        return out

    def num_parameters(self) -> int:
        """Parameter count (tied embedding counted once)."""
        d, v, t, L = self.d_model, self.vocab_size, self.context_length, self.n_layer
        per_block = 12 * d * d + 13 * d  # attn qkv+proj, 4x MLP, 2 LayerNorms, biases
        head = 0 if self.tie_embeddings else v * d
        pos = t * d if self.position_encoding == "learned" else 0
        return v * d + pos + L * per_block + 2 * d + head


def alibi_slopes(n_head: int) -> list[float]:
    """ALiBi head slopes (Press et al. 2022, section 3): for n a power of two, the geometric
    sequence m_h = 2^(-8h/n), h = 1..n. Otherwise the n' = 2^floor(log2 n) slopes of n' heads,
    then the remaining n - n' from the odd terms h = 1, 3, 5, ... of the sequence for 2n'."""
    if n_head < 1:
        raise ValueError(f"n_head must be >= 1, got {n_head}")
    base = 1 << (n_head.bit_length() - 1)  # the largest power of two <= n_head

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    return geometric(base) + geometric(2 * base)[0::2][: n_head - base]


def rope_cos_sin(length: int, head_dim: int, dtype: torch.dtype, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, head_dim/2] of the RoPE angles p * base^(-2j/head_dim) (Su et al.
    2021, eq. 15), computed in float64 and cast, so float32 models lose nothing at long lengths."""
    j = torch.arange(head_dim // 2, dtype=torch.float64, device=device)
    inv_freq = ROPE_BASE ** (-2.0 * j / head_dim)
    angle = torch.arange(length, dtype=torch.float64, device=device)[:, None] * inv_freq[None]
    return angle.cos().to(dtype), angle.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [..., T, head_dim] by the per-position angles: pair (j, j + head_dim/2) becomes
    (x_j cos - x_{j+h} sin, x_j sin + x_{j+h} cos)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def alibi_bias(slopes: torch.Tensor, length: int) -> torch.Tensor:
    """Additive attention bias [H, T, T]: -m_h (i - j) where j <= i, -inf above the diagonal."""
    pos = torch.arange(length, device=slopes.device)
    rel = (pos[None, :] - pos[:, None]).to(slopes.dtype)  # j - i
    bias = slopes[:, None, None] * rel[None]
    return bias.masked_fill((rel > 0)[None], float("-inf"))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, rope: tuple | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``rope``: (cos, sin) of :func:`rope_cos_sin`; ``bias``: the ALiBi bias (causal mask
        included). Neither: plain causal attention."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        shape = (b, t, self.n_head, d // self.n_head)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        dropout_p = self.dropout if self.training else 0.0
        if bias is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout_p)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model, cfg.d_model)
        )

    def forward(self, x: torch.Tensor, rope: tuple | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), rope, bias)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.position_encoding == "learned":
            self.pos_emb = nn.Embedding(cfg.context_length, cfg.d_model)
        if cfg.position_encoding == "alibi":  # a constant, not a parameter; not in the state dict
            self.register_buffer("alibi_slopes", torch.tensor(alibi_slopes(cfg.n_head)), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, 0.02)

    @property
    def max_length(self) -> int | None:
        """Longest input accepted: ``context_length`` for learned absolute positions, None
        (any length) for rope, alibi and none."""
        return self.config.context_length if self.config.position_encoding == "learned" else None

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """Final normalised hidden states [B, T, D] (input of the LM head)."""
        t = idx.shape[1]
        enc = self.config.position_encoding
        rope = bias = None
        if enc == "learned":
            if t > self.config.context_length:
                raise ValueError(
                    f"sequence length {t} exceeds context_length {self.config.context_length}: this "
                    "model has learned absolute position embeddings, which exist only for the "
                    f"{self.config.context_length} positions it was trained on, so it cannot read "
                    f"longer inputs; evaluate at lengths <= {self.config.context_length}, or train "
                    "with GPTConfig(position_encoding='rope', 'alibi' or 'none') to extrapolate"
                )
            pos = torch.arange(t, device=idx.device)
            x = self.tok_emb(idx) + self.pos_emb(pos)[None]
        else:
            x = self.tok_emb(idx)
            if enc == "rope":
                rope = rope_cos_sin(t, self.config.d_model // self.config.n_head, x.dtype, x.device)
            elif enc == "alibi":
                bias = alibi_bias(self.alibi_slopes.to(x.dtype), t)
        for block in self.blocks:
            x = block(x, rope, bias)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits [B, T, V]; with targets also the mean cross-entropy in nats."""
        logits = self.lm_head(self.hidden_states(idx))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def save(self, directory: str) -> None:
        """Write config.json + model.pt (state dict) to ``directory``."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump({"model_type": "tokenbounds-gpt", **self.config.to_dict()}, f, indent=1)
        tmp = os.path.join(directory, "model.pt.tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, os.path.join(directory, "model.pt"))

    @classmethod
    def load(cls, directory: str, map_location="cpu") -> GPT:
        """Inverse of :meth:`save`; a config.json without ``position_encoding`` (every model
        written before the field existed) is a learned-position model."""
        with open(os.path.join(directory, "config.json")) as f:
            cfg = json.load(f)
        if cfg.pop("model_type", None) != "tokenbounds-gpt":
            raise ValueError(f"{directory} does not hold a tokenbounds GPT (config.json model_type)")
        model = cls(GPTConfig(**cfg))
        model.load_state_dict(torch.load(os.path.join(directory, "model.pt"), map_location=map_location))
        return model
