"""LoRA adapters (tokenbounds.compress): what is trainable, merged weights, forward equivalence."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from tokenbounds.compress import (
    LinearAdapter,
    LoRALinear,
    adapters,
    apply_lora,
    merge_adapters,
    remove_adapters,
    trainable_parameters,
    unmerge_adapters,
    wrap_linears,
)
from tokenbounds.models.gpt import GPT, GPTConfig


def _gpt(tie: bool = True) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, context_length=8, n_layer=2, n_head=2, d_model=16, tie_embeddings=tie))


def _perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for a in adapters(model).values():
            a.lora_B.normal_(0.0, 0.3)


def test_counts_only_trainable_parameters_and_freezes_the_base():
    model = _gpt()
    total = sum(p.numel() for p in model.parameters())
    wrapped = apply_lora(model, 3)
    # every untied linear: qkv (16->48), proj (16->16), mlp.0 (16->64), mlp.2 (64->16), per layer
    expected = 2 * 3 * ((16 + 48) + (16 + 16) + (16 + 64) + (64 + 16))
    assert trainable_parameters(model) == expected
    assert sorted(wrapped) == sorted(f"blocks.{i}.{m}" for i in range(2)
                                     for m in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2"))
    assert "lm_head" not in wrapped  # tied to the token embedding: never wrapped
    assert sum(p.numel() for p in model.parameters()) == total + expected
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert frozen == []
    # gradients reach the adapters only
    x = torch.randint(0, 50, (2, 8))
    _perturb(model)
    _, loss = model(x, x)
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in n), n


def test_lora_starts_as_the_base_model_and_merge_gives_w_plus_ba():
    base = _gpt()
    model = _gpt()
    x = torch.randint(0, 50, (3, 8))
    apply_lora(model, 4, alpha=8.0, seed=1)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)  # B = 0 at initialisation
    _perturb(model)
    out = model(x)
    a = adapters(model)["blocks.0.attn.qkv"]
    assert isinstance(a, LoRALinear) and a.scaling == 2.0
    w0 = a.base.weight.detach().clone()
    assert merge_adapters(model) == 8
    torch.testing.assert_close(a.base.weight, w0 + 2.0 * a.lora_B @ a.lora_A)
    torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)  # merged forward = adapter forward
    assert unmerge_adapters(model) == 8
    torch.testing.assert_close(a.base.weight, w0, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="not merged"):
        a.unmerge()
    plain = remove_adapters(model, merge=True)
    assert adapters(plain) == {} and isinstance(plain.blocks[0].attn.qkv, nn.Linear)
    torch.testing.assert_close(plain(x), out, rtol=1e-5, atol=1e-5)


def test_targets_exclude_and_clear_errors():
    model = _gpt(tie=False)
    wrapped = apply_lora(model, 2, targets=["blocks.*.attn.*", "lm_head"], exclude="blocks.1.*")
    assert sorted(wrapped) == ["blocks.0.attn.proj", "blocks.0.attn.qkv", "lm_head"]
    with pytest.raises(ValueError, match="no nn.Linear layer matches"):
        apply_lora(_gpt(), 2, targets="nothing.*")
    with pytest.raises(ValueError, match="tied, never wrapped"):
        apply_lora(_gpt(), 2, targets="lm_head")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRALinear(nn.Linear(4, 4), 0)


def test_wrap_linears_is_generic():
    class Scale(LinearAdapter):  # another reparametrisation: Delta W = s * W
        def __init__(self, base):
            super().__init__(base)
            self.s = nn.Parameter(torch.tensor(0.5))

        def delta_weight(self):
            return self.s * self.base.weight

    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(4, 3)
    ref = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for m in ref:
            if isinstance(m, nn.Linear):
                m.weight.mul_(1.5)
    wrap_linears(model, lambda _n, lin: Scale(lin))
    assert trainable_parameters(model) == 2
    torch.testing.assert_close(model(x), ref(x))
