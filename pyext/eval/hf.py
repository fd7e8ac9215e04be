"""Fused LM head for Hugging Face causal LMs and the project's GPT: no N x V logits.

A causal LM computes ``logits = s * (norm(body(x)) @ W.T + b)``; the smoothed token loss
(Lotfi, Kuang et al. 2024, arXiv 2407.18158, prediction smoothing) only needs, per position,
``log softmax(logits)[y]`` and the rank of ``y``. :class:`FusedHead` runs the model *body* to the
final (already normalised) hidden states ``h``, folds the logit scale ``s`` into ``h``, and hands
``(s h, W, b)`` to :func:`tokenbounds.linear_smoothed_nll`, which streams over vocabulary tiles
so the ``N x V`` logits matrix never exists (as Liger-Kernel's fused linear cross-entropy does).

Supported: ``GPT2LMHeadModel``, ``LlamaForCausalLM`` (and Mistral/Qwen2/SmolLM2: same layout),
``GPTNeoXForCausalLM`` (Pythia), generally any ``*ForCausalLM`` whose ``forward`` is
``lm_head(base_model(...).last_hidden_state)``, with tied embeddings (the head weight *is* the
embedding) and the multiplicative logit scalings ``logit_scale`` (Cohere) and
``logits_scaling`` (Granite). Models with non-linear logit soft-capping (Gemma 2
``final_logit_softcapping``) are refused: ``tanh`` capping is not a linear head.

``patch_model(model)`` swaps ``model.forward`` for a fused one (function or context manager)::

    with patch_model(model):
        out = model(input_ids, labels=input_ids)   # out.loss (nats), out.token_losses, no logits
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from ..losses import DEFAULT_ALPHAS, TokenLosses

_REFUSED_CONFIG_KEYS = ("final_logit_softcapping", "attn_logit_softcapping_final", "logit_softcapping")


class UnsupportedModel(ValueError):
    """The model's LM head is not a (scaled) linear map of the final hidden states."""


def _config_get(config: Any, key: str):
    if config is None:
        return None
    if isinstance(config, dict):
        return config.get(key)
    return getattr(config, key, None)


@dataclass
class FusedOutput:
    """What a patched ``model(...)`` returns: no logits, per-token losses instead.

    loss: mean unsmoothed cross-entropy in nats over the non-ignored targets (or None).
    token_losses: :class:`tokenbounds.TokenLosses` of the shifted targets (flattened [B*(T-1)]).
    """

    loss: torch.Tensor | None
    token_losses: TokenLosses | None
    hidden_states: torch.Tensor
    logits: None = None


class FusedHead:
    """Body + head decomposition of a causal LM.

    ``hidden_states(input_ids)`` -> [B, T, D] final hidden states (after the final norm), already
    multiplied by the logit scale; ``weight`` [V, D]; ``bias`` [V] or None. Then
    ``logits == hidden_states @ weight.T + bias`` up to float rounding.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.kind = "unknown"
        self.scale = 1.0
        config = getattr(model, "config", None)
        for key in _REFUSED_CONFIG_KEYS:
            if _config_get(config, key):
                raise UnsupportedModel(
                    f"{type(model).__name__} applies logit soft-capping ({key}={_config_get(config, key)}): "
                    "tanh(logits / c) * c is not a linear head, so the fused head cannot reproduce it; "
                    "evaluate it with plain logits (tokenbounds.smoothed_nll on model(...).logits)"
                )
        if hasattr(model, "hidden_states") and hasattr(model, "lm_head") and not hasattr(model, "base_model"):
            self.kind = "tokenbounds-gpt"
            self._body = model.hidden_states
            head = model.lm_head
        else:
            get_out = getattr(model, "get_output_embeddings", None)
            head = get_out() if get_out is not None else None
            base = getattr(model, "base_model", None)
            if head is None or base is None or base is model:
                raise UnsupportedModel(
                    f"{type(model).__name__} has no separate body (base_model) and linear output "
                    "embedding (get_output_embeddings()); pass a *ForCausalLM model"
                )
            if not isinstance(head, torch.nn.Linear):
                raise UnsupportedModel(
                    f"the output embedding of {type(model).__name__} is a {type(head).__name__}, not a "
                    "torch.nn.Linear (quantized heads are not supported; dequantize the head)"
                )
            self.kind = f"hf:{_config_get(config, 'model_type')}"
            self._base = base
            self._body = self._hf_body
            logit_scale = _config_get(config, "logit_scale")  # Cohere: logits * logit_scale
            if logit_scale is not None and type(model).__name__.startswith("Cohere"):
                self.scale *= float(logit_scale)
            logits_scaling = _config_get(config, "logits_scaling")  # Granite: logits / logits_scaling
            if logits_scaling is not None:
                self.scale /= float(logits_scaling)
        self.weight: torch.Tensor = head.weight
        self.bias: torch.Tensor | None = getattr(head, "bias", None)
        self.vocab_size = int(_config_get(config, "vocab_size") or self.weight.shape[0])
        self.vocab_size = min(self.vocab_size, int(self.weight.shape[0]))

    def _hf_body(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self._base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "tokenbounds-gpt":
            h = self._body(input_ids)
        else:
            h = self._body(input_ids, attention_mask)
        return h * self.scale if self.scale != 1.0 else h

    def head_params(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = self.weight if self.weight.dtype == dtype else self.weight.to(dtype)
        b = self.bias
        if b is not None and b.dtype != dtype:
            b = b.to(dtype)
        return w, b

    def losses(self, hidden: torch.Tensor, targets: torch.Tensor, alphas=DEFAULT_ALPHAS, *,
               ignore_index: int = -100, max_bytes: int | None = None) -> TokenLosses:
        """:func:`linear_smoothed_nll` of already gathered hidden states [N, D] (cast to float32
        when they are not float32/bf16/fp16)."""
        from ..ops import linear_smoothed_nll

        if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            hidden = hidden.float()
        w, b = self.head_params(hidden.dtype)
        return linear_smoothed_nll(hidden.contiguous(), w, targets, alphas, bias=b, vocab_size=self.vocab_size,
                                   ignore_index=ignore_index, max_bytes=max_bytes)

    def plain_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The model's own logits (for checks only: materialises [B, T, V])."""
        if self.kind == "tokenbounds-gpt":
            return self.model(input_ids)
        return self.model(input_ids=input_ids, use_cache=False).logits


def fused_forward(head: FusedHead, alphas=DEFAULT_ALPHAS):
    """A drop-in ``forward(input_ids, labels=None, attention_mask=None, ...)`` returning
    :class:`FusedOutput`; labels follow the HF convention (same shape as input_ids, shifted
    inside, -100 ignored)."""

    def forward(input_ids=None, labels=None, attention_mask=None, **_: Any) -> FusedOutput:
        h = head.hidden_states(input_ids, attention_mask)
        if labels is None:
            return FusedOutput(loss=None, token_losses=None, hidden_states=h)
        hs = h[:, :-1, :].reshape(-1, h.shape[-1])
        tgt = labels[:, 1:].reshape(-1).to(torch.int64)
        if attention_mask is not None:
            tgt = torch.where(attention_mask[:, 1:].reshape(-1).bool(), tgt, torch.full_like(tgt, -100))
        tl = head.losses(hs, tgt, alphas)
        valid = tl.valid
        loss = -(tl.logp[valid].double().mean()).float() if bool(valid.any()) else None
        return FusedOutput(loss=loss, token_losses=tl, hidden_states=h)

    return forward


class _Patch(contextlib.AbstractContextManager):
    def __init__(self, model: torch.nn.Module, alphas):
        self.model = model
        self.head = FusedHead(model)
        self._had_instance_forward = "forward" in model.__dict__
        self._old = model.__dict__.get("forward")
        model.forward = fused_forward(self.head, alphas)  # type: ignore[method-assign]
        model._tokenbounds_patch = self  # type: ignore[attr-defined]

    def undo(self) -> None:
        if self._had_instance_forward:
            self.model.forward = self._old  # type: ignore[method-assign]
        else:
            self.model.__dict__.pop("forward", None)
        self.model.__dict__.pop("_tokenbounds_patch", None)

    def __enter__(self):
        return self.model

    def __exit__(self, *exc) -> None:
        self.undo()


def patch_model(model: torch.nn.Module, alphas=DEFAULT_ALPHAS) -> _Patch:
    """Replace ``model.forward`` by the fused-head forward (see module docstring).

    Use as a function (``patch_model(model)``; undo with :func:`unpatch_model`) or as a context
    manager (``with patch_model(model) as m:``; restored on exit). Raises
    :class:`UnsupportedModel` for heads that are not linear (e.g. soft-capped logits).
    """
    return _Patch(model, alphas)


def unpatch_model(model: torch.nn.Module) -> None:
    """Undo :func:`patch_model` (no-op if the model is not patched)."""
    p = model.__dict__.get("_tokenbounds_patch")
    if p is not None:
        p.undo()
