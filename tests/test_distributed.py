"""`tokenbounds evaluate` under torchrun with 2 CPU processes (gloo) equals the single-process run
(window units, sampled: per-token and per-unit statistics bit-identical)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

pytest.importorskip("transformers")

from _tiny_models import random_tokens, tiny_hf  # noqa: E402
from tokenbounds.cli import main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_torchrun_two_processes_equals_single(tmp_path):
    tiny_hf("gpt2", str(tmp_path / "m"))
    random_tokens(str(tmp_path / "d.bin"), 2500)

    def args(out):
        return ["evaluate", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.bin"),
                "--sample-tokens", "300", "--out", str(out), "--window", "24", "--batch-size", "4",
                "--checkpoint-every", "1", "--no-progress", "--no-plots", "--threads", "1", "--device", "cpu"]

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tokenbounds.cli", *args(tmp_path / "dist")]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(args(tmp_path / "single")) == 0
    d = json.loads((tmp_path / "dist" / "stats.json").read_text())
    s = json.loads((tmp_path / "single" / "stats.json").read_text())
    assert d["evaluation"]["run"]["world_size"] == 2 and s["evaluation"]["run"]["world_size"] == 1
    assert d["unit_stats"]["draws"] == 300 and d["evaluation"]["scoring"]["mode"] == "windows"
    # bit-identical statistics (per token, per unit, histogram, by context length): same blocks,
    # merged in block order
    assert {k: v for k, v in d.items() if k != "evaluation"} == {k: v for k, v in s.items() if k != "evaluation"}
    for key in ("histogram", "by_context_length", "summary"):
        assert d["evaluation"][key] == s["evaluation"][key]
    # each rank evaluated about half of the units, wrote its blocks and its own log
    scored = d["evaluation"]["scoring"]["scored_tokens"]
    assert 0 < d["evaluation"]["run"]["tokens_this_run_rank0"] < scored
    assert len(os.listdir(tmp_path / "dist" / "checkpoint")) == d["evaluation"]["run"]["blocks"] + 1
    assert (tmp_path / "dist" / "evaluate.rank1.log").exists()
