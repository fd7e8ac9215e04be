"""Scaling pipeline helpers and the embedding quantizer (tokenbounds.quant.embedding)."""

from __future__ import annotations

import math

import pytest
import torch
from tokenbounds.eval.pipeline import (
    DEMO_CONFIG,
    TINY_CONFIG,
    PipelineConfig,
    QuantChoice,
    choice_cost_bits,
    training_steps,
)
from tokenbounds.models.gpt import GPT, GPTConfig
from tokenbounds.quant import QuantizedModel, quantize_model
from tokenbounds.quant.embedding import compact_unquantized, quantize_embeddings


def test_choice_cost_bits():
    assert choice_cost_bits(1) == 0.0
    assert choice_cost_bits(10) == pytest.approx(math.log2(10))
    with pytest.raises(ValueError, match="num_candidates"):
        choice_cost_bits(0)


def test_training_steps_follow_the_token_rule():
    cfg = PipelineConfig(tokens_per_parameter=20.0, batch_size=32, context_length=32)
    n = 20_000
    steps = training_steps(n, cfg)
    assert (steps - 1) * 32 * 32 < 20 * n <= steps * 32 * 32
    assert training_steps(n, PipelineConfig(max_steps=5)) == 5


def test_demo_config_is_compute_optimal_and_paid():
    cfg = DEMO_CONFIG
    assert cfg.tokens_per_parameter == 20.0 and cfg.max_steps is None
    assert len(cfg.sizes) == 3 and 1 <= cfg.eval_stride <= cfg.context_length
    ns = [GPTConfig(vocab_size=cfg.vocab_size, context_length=cfg.context_length, n_layer=s.n_layer,
                    n_head=s.n_head, d_model=s.d_model).num_parameters() for s in cfg.sizes]
    assert ns == sorted(ns) and ns[-1] > 4 * ns[0]
    labels = [c.label for c in cfg.grid]
    assert len(set(labels)) == len(labels) >= 8
    assert {"e8", "uniform"} == {c.codebook for c in cfg.grid} and {"ldlq", "rtn"} == {c.method for c in cfg.grid}
    assert cfg.select_seed not in (cfg.seed, cfg.calibration_seed)  # a seed used nowhere else
    assert len(TINY_CONFIG.grid) >= 2
    assert QuantChoice("uniform", 3, "ldlq").label == "uniform3-ldlq"


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, context_length=16, n_layer=1, n_head=2, d_model=16))
    calib = torch.randint(0, 64, (4, 16))
    return model, calib


def test_quantize_embeddings_codes_the_position_embedding(small_model):
    model, calib = small_model
    qm = quantize_model(model, calib, bits=4, method="rtn", progress=False)
    assert "pos_emb.weight" in qm.unquantized and "tok_emb.weight" in qm.tied  # token emb via lm_head
    qe = quantize_embeddings(model, qm, bits=4, method="rtn")
    assert "pos_emb.weight" in qe.layers and "pos_emb.weight" not in qe.unquantized
    assert "pos_emb.weight" in qm.unquantized  # the input is not modified
    assert qe.coded_bits < qm.coded_bits
    # saves about 32 - ~4 bits per position-embedding entry
    n = model.pos_emb.weight.numel()
    assert qm.coded_bits - qe.coded_bits > 20 * n
    deq = qe.dequantized_model(model)
    w, wq = model.pos_emb.weight.detach(), deq.pos_emb.weight.detach()
    assert not torch.equal(w, wq)
    assert float((w - wq).pow(2).mean() / w.pow(2).mean()) < 0.05
    # round trip of the whole message reproduces the decoded model bit-exactly
    back = QuantizedModel.decode(qe.encode())
    sd1, sd2 = qe.dequantized_state_dict(), back.dequantized_state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k


def test_tied_head_is_recoded_with_identity_hessian(small_model):
    from tokenbounds.quant import quantize_weight

    model, calib = small_model
    qm = quantize_model(model, calib, bits=3, method="ldlq", progress=False)
    head = qm.layers["lm_head.weight"]
    qe = quantize_embeddings(model, qm, bits=3, method="ldlq")
    expected = quantize_weight(model.lm_head.weight.detach(), None, bits=3, method="ldlq", seed=head.seed)
    assert torch.equal(qe.layers["lm_head.weight"].codes, expected.codes)
    assert not torch.equal(head.codes, expected.codes)  # the head Hessian gave other codes
    assert qe.config["embeddings"]["recoded_tied"] == ["lm_head.weight"]
    kept = quantize_embeddings(model, qm, bits=3, method="ldlq", recode_tied=False)
    assert kept.layers["lm_head.weight"] is head
    # the decoded model shares the recoded weight between embedding and head
    deq = qe.dequantized_model(model)
    assert deq.tok_emb.weight is deq.lm_head.weight
    assert torch.equal(deq.lm_head.weight.detach(), expected.dequantize())


def test_compact_unquantized_halves_the_kept_tensors(small_model):
    model, calib = small_model
    qm = quantize_embeddings(model, quantize_model(model, calib, bits=4, method="rtn", progress=False))
    qc = compact_unquantized(qm)
    d0, d1 = qm.coded_bits_detail, qc.coded_bits_detail
    assert d1["unquantized_bits"] == pytest.approx(d0["unquantized_bits"] / 2)
    assert d1["quantized_bits"] == d0["quantized_bits"]
    deq = qc.dequantized_model(model)
    assert deq.ln_f.weight.dtype == torch.float32  # loaded into the model's dtype
    assert torch.equal(deq.ln_f.bias, model.ln_f.bias.detach().half().float())
    big = QuantizedModel(layers={}, unquantized={"x": torch.tensor([1e6])})
    with pytest.raises(ValueError, match="overflows"):
        compact_unquantized(big)
    with pytest.raises(TypeError, match="QuantizedModel"):
        compact_unquantized({"x": 1})


# ----------------------------------------------------------------------------- compression candidates
def test_grid_counts_every_compression_candidate():
    from dataclasses import replace

    from tokenbounds.eval.pipeline import grid_candidates

    assert len(grid_candidates(DEMO_CONFIG)) == len(DEMO_CONFIG.grid)  # the default adds nothing
    cfg = replace(DEMO_CONFIG, compression=("subspace:d=2000", "lora:rank=4", "sublora:rank=4,d=2000"))
    entries = grid_candidates(cfg)
    rtn = {(q.codebook, q.bits, q.incoherence) for q in DEMO_CONFIG.grid}
    # subspace coordinates have no Hessian (LDLQ = RTN): their rtn variants only, none paid twice
    assert len(entries) == 2 * len(DEMO_CONFIG.grid) + 2 * len(rtn)
    labels = [e.label for e in entries]
    assert len(set(labels)) == len(labels)
    assert all(e.quant.method == "rtn" for e in entries if "subspace" in e.parametrization
               or e.parametrization.startswith("sublora"))
    assert {e.parametrization for e in entries} == {"dense", "subspace:d=2000", "lora:rank=4", "sublora:rank=4,d=2000"}
    for bad, msg in [(("dense",), "always in the grid"), (("kron", "kron"), "given twice"),
                     (("lora:rank=2,base=uniform5-rtn",), "names no quantizer of the grid"),
                     (("qlora:rank=2",), "unknown compression 'qlora'")]:
        with pytest.raises(ValueError, match=msg):
            grid_candidates(replace(DEMO_CONFIG, compression=bad))


def test_split_specs():
    from tokenbounds.compress import split_specs

    assert split_specs("sublora:rank=4,d=2000,kron,kron:rank=2+subspace:d=10,projector=dense") == [
        "sublora:rank=4,d=2000", "kron", "kron:rank=2+subspace:d=10,projector=dense"]
    for bad, msg in [("kron,,monarch", "empty spec"), ("d=10,kron", "starts with an option")]:
        with pytest.raises(ValueError, match=msg):
            split_specs(bad)


def test_pipeline_with_a_compression_candidate(tmp_path):
    """One tiny model, the dense grid + a SubLoRA and a LoRA spec: K counts them, log2 K is paid,
    the report shows which parametrization wins; a spec that does not fit a size fails before
    training."""
    from dataclasses import replace

    from tokenbounds.eval.pipeline import format_markdown, run_pipeline

    spec = "sublora:rank=2,d=100"
    on_base = "lora:rank=2,base=uniform4-rtn"  # LoRA on the dense model quantized by the grid's uniform4-rtn
    cfg = replace(TINY_CONFIG, sizes=TINY_CONFIG.sizes[-1:], compression=(spec, "lora:rank=2", on_base))
    lines: list[str] = []
    res = run_pipeline(cfg, str(tmp_path / "cache"), progress=False, log=lines.append)
    (m,) = res["models"]
    k = 4 * len(TINY_CONFIG.grid)  # the tiny grid is all rtn: each quantizer once per parametrization
    q = m["quantization"]
    assert q["num_candidates"] == len(q["candidates"]) == k
    assert m["code_length"]["extra_bits"] == pytest.approx(cfg.selection_bits + math.log2(k))
    assert q["chosen"] == min(q["candidates"], key=lambda c: c["predicted_bound_bits"])["label"]
    comp = m["compression"]
    assert [r["parametrization"] for r in comp["parametrizations"]] == ["dense", spec, "lora:rank=2", on_base]
    sub, lora, _ = comp["parametrizations"][1:]
    assert lora["training"]["trained_values"] == sum(2 * (i + o) for i, o in ((24, 72), (24, 24), (24, 96), (96, 24)))
    assert sub["training"]["tokens"] == m["training"]["tokens"]  # equal training tokens
    assert sub["training"]["trained_values"] == 100
    mine = [c for c in q["candidates"] if c["parametrization"] == spec]
    assert len(mine) == len(TINY_CONFIG.grid)
    for c in mine:  # C: coordinates + header (architecture, spec, seeds) + tokenizer, no weights
        assert c["coded_bits_detail"]["weights_bits"] == 0 and c["coded_bits_detail"]["coordinates_bits"] > 0
    for c in q["candidates"]:
        if c["parametrization"] == "lora:rank=2":  # the adapters only: far below the dense code
            dense_c = next(d for d in q["candidates"] if d["label"] == c["label"].rpartition(" @ ")[2])
            assert 0 < c["model_coded_bits"] < 0.5 * dense_c["model_coded_bits"]
        if c["parametrization"] == on_base:  # the pretrained base's whole code is counted
            base = next(d for d in q["candidates"] if d["label"] == "uniform4-rtn")
            assert c["coded_bits_detail"]["base_bits"] == base["model_coded_bits"]
            assert c["model_coded_bits"] > base["model_coded_bits"]
        assert c["coded_bits"] == pytest.approx(c["model_coded_bits"] + c["architecture_bits"]
                                                + res["corpus"]["tokenizer_bits"])
    md = format_markdown(res)
    assert "which parametrization wins" in md and f"`{spec}`" in md and "**wins**" in md
    # a rerun reuses the trained candidate and its coded grid
    lines.clear()
    res2 = run_pipeline(cfg, str(tmp_path / "cache"), progress=False, log=lines.append)
    assert any("reusing the trained candidate" in ln for ln in lines)
    assert res2["models"][0]["bounds"]["best"] == m["bounds"]["best"]
    too_big = replace(cfg, compression=("sublora:rank=2,d=100000",))
    with pytest.raises(ValueError, match=r"does not fit model L .*exceeds the number of trainable parameters"):
        run_pipeline(too_big, str(tmp_path / "cache"), progress=False, log=lines.append)
