"""The README's quickstart runs as written (a broken README example is a broken release)."""

from __future__ import annotations

import pathlib
import re

import torch
from tokenbounds.models.gpt import GPT, GPTConfig

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs(capsys):
    text = README.read_text()
    section = text[text.index("## Quickstart"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, context_length=16, n_layer=1, n_head=2, d_model=16)).eval()
    tokens = torch.randint(0, 97, (2, 17))
    namespace = {"model": model, "tokens": tokens}
    with torch.no_grad():
        exec(compile(code, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "best:" in out, "the quickstart prints the table of bounds"
    # a valid use: the statistics cover every one of the m tokens once (finding 2 of issue 10)
    table = namespace["table"]
    assert table.inputs["design"] == "full-pass" and table.inputs["m"] == tokens[:, 1:].numel()
    assert table.best["valid"] and table.bounds[table.best["label"]].valid
