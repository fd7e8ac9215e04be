"""Loading a model for evaluation: a tokenbounds GPT directory or a local Hugging Face causal LM
(plain, GGUF or already-quantized), with its tokenizer, its fingerprint and what its weights cost
to describe.

Hubs are offline (``HF_HUB_OFFLINE=1``): ``--model`` is always a local directory.

**What the evaluated weights cost (the default complexity term).** A model whose weights are
stored in dtype d is described exactly by its parameters at ``bits(d)`` bits each plus its
architecture (the config, 8 bits per JSON character). :func:`weights_code_bits` counts each
unique parameter tensor (tied weights once) at the bits of the dtype it is *evaluated* in: 32 for
a float32 checkpoint (our GPTs, GPT-2), 16 only when the model was cast to bfloat16/float16 before
evaluating, which is then the model that is evaluated. A deterministic function of a coded model
(dequantizing a GGUF file, then casting) is described by the same code, so a GGUF file's size
stays a valid C whatever dtype it is evaluated in.

**The tokenizer.** When the tokenizer was trained on the evaluated data (our GPT directories:
``tokenizer.json`` trained on the corpus) it is part of the hypothesis and its code length is
added to C (:func:`tokenizer_code_bits`): the merge-list code of
:func:`tokenbounds.eval.data.tokenizer_description_bits` when the file has exactly the structure
:func:`~tokenbounds.eval.data.train_tokenizer` produces, else 8 bits per byte of the
LZMA-compressed file.
"""

from __future__ import annotations

import glob
import json
import logging
import lzma
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .fileio import HASH_FULL_LIMIT_BYTES, file_digest

__all__ = [
    "LoadedModel",
    "directory_fingerprint",
    "find_gguf",
    "gguf_quant_type",
    "load_model",
    "tokenizer_code_bits",
    "weights_code_bits",
]

log = logging.getLogger("tokenbounds.evaluate")

DTYPE_BITS = {"float64": 64, "float32": 32, "bfloat16": 16, "float16": 16}
GGUF_BITS = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q4_K_M": 4, "Q4_K_S": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8,
             "Q2_K": 2, "Q3_K": 3, "Q3_K_M": 3, "Q6_K": 6, "F16": 16, "BF16": 16, "F32": 32}
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json")


@dataclass
class LoadedModel:
    """A model ready to evaluate and what the engine needs to know about it.

    ``tokenizer``: callable ``list[str] -> list[list[int]]`` (None without one); ``bos_id``: the
    tokenizer's beginning-of-sequence id (the ``auto`` prefix token) or None; ``eos_id``: its
    end-of-text id; ``tokenizer_trained_on_data``: True for our own GPT directories, whose
    tokenizer was trained on the corpus (its bits then count in C)."""

    model: Any
    kind: str
    path: str
    num_parameters: int
    context_length: int | None
    quantization: dict[str, Any]
    dtype: str = "float32"
    gguf_file: str | None = None
    tokenizer: Any = None
    tokenizer_files: list[str] = field(default_factory=list)
    eos_id: int | None = None
    bos_id: int | None = None
    bos_source: str = "the tokenizer defines no BOS"
    tokenizer_trained_on_data: bool = False
    config_dict: dict[str, Any] = field(default_factory=dict)


def _files_of(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    return sorted(
        p for p in glob.glob(os.path.join(path, "*"))  # not recursive: a run dir inside stays out
        if os.path.isfile(p) and not os.path.basename(p).startswith(".")
        and not p.endswith((".py", ".pyc", ".md", ".lock", ".log"))
    )


def directory_fingerprint(path: str) -> dict[str, Any]:
    """sha256 over the model's files (config, weights, tokenizer) in name order."""
    import hashlib

    files = _files_of(path)
    total = sum(os.path.getsize(p) for p in files)
    limit = HASH_FULL_LIMIT_BYTES if total <= HASH_FULL_LIMIT_BYTES else 0
    h = hashlib.sha256()
    methods = set()
    base = path if os.path.isdir(path) else os.path.dirname(path)
    for p in files:
        info = file_digest(p, limit)
        methods.add(info["method"])
        h.update(os.path.relpath(p, base).encode())
        h.update(info["sha256"].encode())
    return {"sha256": h.hexdigest(), "files": len(files), "bytes": total, "method": ", ".join(sorted(methods))}


def find_gguf(path: str, gguf_file: str | None) -> str | None:
    """The GGUF file to load: the one given, else the only ``*.gguf`` of a directory without a
    config.json (several are an error: choose one with --gguf-file)."""
    if gguf_file:
        return gguf_file
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        found = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(found) == 1:
            return os.path.basename(found[0])
        if len(found) > 1:
            raise ValueError(f"{path} holds {len(found)} .gguf files; choose one with --gguf-file")
    return None


def gguf_quant_type(name: str) -> str | None:
    """``Q4_1`` from ``SmolLM2-135M-Instruct.Q4_1.gguf`` (None when the name says nothing)."""
    m = re.search(r"\b(I?Q\d[_A-Z0-9]*|F16|BF16|F32)\b", os.path.basename(name).replace(".", " ").upper())
    return m.group(1) if m else None


def _gguf_quantization(path: str, gguf: str) -> dict[str, Any]:
    qt = gguf_quant_type(gguf)
    gpath = gguf if os.path.isabs(gguf) else os.path.join(path, gguf)
    bits = GGUF_BITS.get(qt or "")
    quantized = bits is not None and bits < 16
    note = (f"the checkpoint was loaded from a GGUF file of type {qt}: its weights were already quantized to "
            f"{bits}-bit blocks and were dequantized on load, so re-quantizing it to >= {bits} bits is nearly "
            "free; its compressed size says little about what a quantizer achieves on a full-precision model"
            if quantized else f"loaded from GGUF ({qt})")
    return {"already_quantized": quantized, "format": "GGUF", "gguf_file": gguf, "gguf_type": qt,
            "weight_bits": bits, "gguf_bytes": os.path.getsize(gpath), "note": note}


def _unique_parameters(model) -> list[Any]:
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _torch_dtype(dtype: str):
    import torch

    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}") from None


def load_model(path: str, *, gguf_file: str | None = None, dtype: str = "float32",
               tokenizer_path: str | None = None, attn_implementation: str | None = None) -> LoadedModel:
    """Load a tokenbounds GPT directory or a Hugging Face causal LM from a local directory, cast
    to ``dtype`` (what is then evaluated), with its tokenizer when one is present.
    ``attn_implementation="eager"`` for second derivatives (SDPA has no double backward on CPU)."""
    torch_dtype = _torch_dtype(dtype)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--model {path} does not exist (a local directory is required; hubs are offline)")
    cfg_path = os.path.join(path, "config.json")
    cfg: dict[str, Any] = {}
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
    if cfg.get("model_type") == "tokenbounds-gpt":
        return _load_gpt(path, cfg, dtype, torch_dtype, tokenizer_path)
    return _load_hf(path, dtype, torch_dtype, gguf_file, tokenizer_path, attn_implementation)


def _load_gpt(path, cfg, dtype, torch_dtype, tokenizer_path) -> LoadedModel:
    from ..models.gpt import GPT

    model = GPT.load(path).to(torch_dtype).eval()
    lm = LoadedModel(model, "tokenbounds-gpt", path, sum(p.numel() for p in _unique_parameters(model)),
                     model.config.context_length, {"already_quantized": False}, dtype=dtype, config_dict=cfg)
    tok_file = tokenizer_path or os.path.join(path, "tokenizer.json")
    if os.path.isdir(tok_file):
        tok_file = os.path.join(tok_file, "tokenizer.json")
    if os.path.exists(tok_file):
        from tokenizers import Tokenizer

        tk = Tokenizer.from_file(tok_file)
        lm.tokenizer = lambda docs: [e.ids for e in tk.encode_batch(list(docs), add_special_tokens=False)]
        lm.tokenizer_files = [tok_file]
        lm.eos_id = tk.token_to_id("<|endoftext|>")
        lm.tokenizer_trained_on_data = True  # our BPE is trained on the corpus the model learns
    return lm


def _load_hf(path, dtype, torch_dtype, gguf_file, tokenizer_path, attn_implementation) -> LoadedModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        raise ValueError(f"{path} is not a tokenbounds GPT; loading a Hugging Face model needs the transformers "
                         f"package ({err}): pip install 'tokenbounds[hf]'") from err

    gguf = find_gguf(path, gguf_file)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": True}
    if gguf:
        kwargs["gguf_file"] = gguf
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    quant: dict[str, Any] = {"already_quantized": False}
    if gguf:
        quant = _gguf_quantization(path, gguf)
    qcfg = getattr(model.config, "quantization_config", None)
    if qcfg is not None and not gguf:
        qd = qcfg if isinstance(qcfg, dict) else qcfg.to_dict()
        bits = 4 if qd.get("load_in_4bit") else 8 if qd.get("load_in_8bit") else qd.get("bits")
        quant = {"already_quantized": True, "format": qd.get("quant_method", "unknown"), "weight_bits": bits,
                 "note": f"the checkpoint is already quantized ({qd.get('quant_method')}, {bits}-bit)"}
    ctx = None
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(model.config, key, None)
        if v:
            ctx = int(v)
            break
    n_params = sum(p.numel() for p in _unique_parameters(model))
    lm = LoadedModel(model, f"hf:{model.config.model_type}", path, n_params, ctx, quant, dtype=dtype,
                     gguf_file=gguf, config_dict=json.loads(model.config.to_json_string(use_diff=False)))
    try:
        tk = AutoTokenizer.from_pretrained(tokenizer_path or path, local_files_only=True,
                                           **({"gguf_file": gguf} if gguf and not tokenizer_path else {}))
    except Exception as exc:  # noqa: BLE001 - no tokenizer is fine for .bin data
        log.info("no tokenizer loaded from %s (%s); .txt/.jsonl data need one", tokenizer_path or path, exc)
        tk = None
    if tk is not None:
        lm.tokenizer = lambda docs: [list(x) for x in tk(list(docs), add_special_tokens=False)["input_ids"]]
        lm.eos_id = tk.eos_token_id if tk.eos_token_id is not None else tk.bos_token_id
        lm.bos_id = tk.bos_token_id
        if lm.bos_id is not None:
            lm.bos_source = f"the tokenizer's BOS {tk.bos_token!r}"
        base = tokenizer_path or path
        lm.tokenizer_files = sorted(
            p for p in glob.glob(os.path.join(base, "*")) if os.path.basename(p) in TOKENIZER_FILES
        ) or ([os.path.join(path, gguf)] if gguf else [])
    else:
        bos = getattr(model.config, "bos_token_id", None)
        if isinstance(bos, int):
            lm.bos_id, lm.bos_source = int(bos), "no tokenizer: the model config's bos_token_id"
    return lm


def weights_code_bits(lm: LoadedModel) -> dict[str, Any]:
    """Bits that describe the evaluated weights exactly: every unique parameter tensor at the bits
    of its dtype, plus the architecture (8 bits per character of the compact JSON config)."""
    by_dtype: dict[str, int] = {}
    for p in _unique_parameters(lm.model):
        name = str(p.dtype).replace("torch.", "")
        by_dtype[name] = by_dtype.get(name, 0) + p.numel()
    unknown = [d for d in by_dtype if d not in DTYPE_BITS]
    if unknown:
        raise ValueError(f"parameters of dtype {unknown} have no known bit width; pass --coded-bits")
    weight_bits = float(sum(DTYPE_BITS[d] * n for d, n in by_dtype.items()))
    config_bits = 8.0 * len(json.dumps(lm.config_dict, sort_keys=True, separators=(",", ":"), default=str))
    return {"weight_bits": weight_bits, "config_bits": config_bits, "parameters_by_dtype": by_dtype}


def tokenizer_code_bits(path: str) -> dict[str, Any]:
    """Code length of a tokenizer file: the merge-list code of
    :func:`~tokenbounds.eval.data.tokenizer_description_bits` when the file is exactly what
    :func:`~tokenbounds.eval.data.train_tokenizer` produces (byte-level BPE, ``<|endoftext|>`` = 0,
    256 byte symbols, one token per merge), else 8 x the LZMA-compressed bytes of the file."""
    from .data import EOT, tokenizer_description_bits, tokenizer_merges

    with open(path, "rb") as f:
        raw = f.read()
    try:
        from tokenizers import Tokenizer

        tk = Tokenizer.from_file(path)
        spec = json.loads(raw)
        merges = tokenizer_merges(tk)
        ours = (spec.get("model", {}).get("type") == "BPE" and tk.token_to_id(EOT) == 0
                and spec.get("pre_tokenizer", {}).get("type") == "ByteLevel"
                and tk.get_vocab_size() == 257 + len(merges))
    except Exception:  # noqa: BLE001 - not a tokenizers file: fall back to its compressed size
        ours = False
    if ours:
        return {"bits": tokenizer_description_bits(tk), "method": "byte-level BPE merge list "
                "(tokenbounds.eval.data.tokenizer_description_bits)", "file": os.path.abspath(path)}
    return {"bits": 8.0 * len(lzma.compress(raw, preset=9)), "method": "8 x LZMA-compressed file bytes",
            "file": os.path.abspath(path)}
