"""Fused head (patch_model / FusedHead) equals plain model(...).logits for each model family."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from _tiny_models import VOCAB, tiny_hf  # noqa: E402
from tokenbounds import smoothed_nll  # noqa: E402
from tokenbounds.eval.hf import FusedHead, UnsupportedModel, patch_model, unpatch_model  # noqa: E402


def _check_equal(model, head_kind_prefix: str):
    head = FusedHead(model)
    assert head.kind.startswith(head_kind_prefix)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (3, 17), generator=g)
    y = torch.randint(0, VOCAB, (3, 17), generator=g)
    with torch.no_grad():
        logits = head.plain_logits(x).float()
        plain = smoothed_nll(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        h = head.hidden_states(x)
        fused = head.losses(h.reshape(-1, h.shape[-1]), y.reshape(-1))
    assert plain.nll_bits.std() > 0.05  # the model is not uniform: the test can fail
    torch.testing.assert_close(fused.nll_bits, plain.nll_bits, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fused.logp, plain.logp, rtol=1e-5, atol=1e-4)
    assert (fused.rank - plain.rank).abs().max() <= 1  # near-ties may swap in float32
    assert (fused.rank == plain.rank).float().mean() > 0.95


@pytest.mark.parametrize("family", ["gpt2", "llama", "gptneox"])
def test_fused_head_equals_logits(tmp_path, family):
    model = tiny_hf(family, str(tmp_path))
    _check_equal(model, "hf:")


def test_untied_llama_and_head_bias(tmp_path):
    model = tiny_hf("llama", str(tmp_path), tie_word_embeddings=False)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    _check_equal(model, "hf:")
    # a head with a bias (as some checkpoints have) is folded in too
    lin = torch.nn.Linear(32, VOCAB, bias=True)
    with torch.no_grad():
        lin.weight.copy_(model.lm_head.weight)
        lin.bias.normal_(0, 1.0)
    model.lm_head = lin
    _check_equal(model, "hf:")


def test_logit_scaling_folded(tmp_path):
    model = tiny_hf("llama", str(tmp_path))
    model.config.logits_scaling = 4.0  # Granite convention: logits / logits_scaling
    head = FusedHead(model)
    assert head.scale == pytest.approx(0.25)
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=x).logits / 4.0
        h = head.hidden_states(x)
        torch.testing.assert_close(h @ head.weight.t(), ref, rtol=1e-5, atol=1e-5)


def test_softcapping_refused(tmp_path):
    model = tiny_hf("gpt2", str(tmp_path))
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(UnsupportedModel, match="soft-capping"):
        FusedHead(model)


def test_tokenbounds_gpt():
    from tokenbounds.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, context_length=32, n_layer=1, n_head=2, d_model=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    _check_equal(model, "tokenbounds-gpt")


def test_patch_model_context_manager_and_function(tmp_path):
    model = tiny_hf("gpt2", str(tmp_path))
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=x, labels=x)
        with patch_model(model) as m:
            out = m(input_ids=x, labels=x)
            assert out.logits is None and out.token_losses is not None
            assert out.token_losses.nll_bits.shape == (2 * 11, 8)
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
        assert model(input_ids=x).logits.shape == (2, 12, VOCAB)  # restored
        patch_model(model)
        out2 = model(input_ids=x, labels=x)
        assert out2.logits is None
        torch.testing.assert_close(out2.loss, ref.loss, rtol=1e-5, atol=1e-5)
        unpatch_model(model)
        assert model(input_ids=x).logits is not None
