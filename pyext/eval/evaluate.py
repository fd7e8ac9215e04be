"""``tokenbounds evaluate``: sampled token-level statistics of a model, resumable and distributed.

Pipeline (Lotfi, Kuang et al. 2024, arXiv 2407.18158, section 4; ``spec/bounds.md`` section 3):

1. Data: nanoGPT-style token files (``.bin``, memory-mapped) or ``.txt`` / ``.jsonl`` text
   tokenized with the model's local tokenizer and cached as ``.bin`` (``EOT d1 EOT d2 ... EOT``).
   Several files form one virtual concatenation; contexts never cross a file boundary.
2. Sample: the m data points are the positions with at least one preceding token in their file
   (m = sum_f (n_f - 1)). s indices ``u ~ Uniform{0..m-1}`` with replacement are drawn by
   ``numpy.random.default_rng(seed).integers(0, m, s)`` (for one file this is exactly
   :func:`tokenbounds.eval.sample.sample_tokens`), recorded by seed + sha256 of the positions.
   The context of position i is the up to L preceding tokens, starting no earlier than the last
   end-of-text token before i (unless ``cross_documents``) nor the start of i's file.
3. Batches: samples are ordered by context length (longest first, stable), cut into batches of
   B, and batches into *blocks* of K. Each block's statistics (:class:`EvalState`: LossStats +
   a fixed-bin histogram of the unsmoothed loss + sums by context length) depend only on its own
   batches; the final statistics are the blocks merged **in block order**. So a resumed run
   (blocks checkpointed atomically, :mod:`.checkpoint`) and a run sharded over P processes
   (block j on rank j mod P, :mod:`.distributed`) give bit-identical results.
4. Every batch is scored by the fused head (:class:`tokenbounds.eval.hf.FusedHead`): body ->
   final hidden state at the last context position -> ``linear_smoothed_nll``; no N x V logits.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..losses import DEFAULT_ALPHAS, LossStats
from .checkpoint import CheckpointError, config_hash, load_checkpoint, save_checkpoint
from .sample import positions_digest

HIST_MAX_BITS = 40.0
HIST_BINS = 160
"""The loss histogram has HIST_BINS bins of width HIST_MAX_BITS / HIST_BINS over [0, 40) bits,
plus one overflow bin (losses >= 40 bits or infinite)."""
POS_BUCKETS = 32
HASH_FULL_LIMIT_BYTES = 4 << 30
"""Files larger than this (in total) are fingerprinted (size + first/last 64 MiB), not hashed."""
STATS_FORMAT = "tokenbounds.evaluate/1"

log = logging.getLogger("tokenbounds.evaluate")


# ----------------------------------------------------------------------------- hashing
def _sha256_file(path: str, limit: int = HASH_FULL_LIMIT_BYTES) -> dict[str, Any]:
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= limit:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
            return {"sha256": h.hexdigest(), "bytes": size, "method": "sha256"}
        part = 64 << 20
        h.update(f.read(part))
        f.seek(size - part)
        h.update(f.read(part))
        h.update(str(size).encode())
        return {"sha256": h.hexdigest(), "bytes": size, "method": "sha256(first 64MiB + last 64MiB + size)"}


def directory_fingerprint(path: str) -> dict[str, Any]:
    """sha256 over the model's files (config, weights, tokenizer) in name order."""
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted(
            p for p in glob.glob(os.path.join(path, "*"))  # not recursive: a run dir inside stays out
            if os.path.isfile(p) and not os.path.basename(p).startswith(".")
            and not p.endswith((".py", ".pyc", ".md", ".lock", ".log"))
        )
    total = sum(os.path.getsize(p) for p in files)
    limit = HASH_FULL_LIMIT_BYTES if total <= HASH_FULL_LIMIT_BYTES else 0
    h = hashlib.sha256()
    methods = set()
    for p in files:
        info = _sha256_file(p, limit)
        methods.add(info["method"])
        h.update(os.path.relpath(p, path if os.path.isdir(path) else os.path.dirname(p)).encode())
        h.update(info["sha256"].encode())
    return {"sha256": h.hexdigest(), "files": len(files), "bytes": total, "method": ", ".join(sorted(methods))}


# ----------------------------------------------------------------------------- model loading
@dataclass
class LoadedModel:
    model: Any
    kind: str
    path: str
    num_parameters: int
    context_length: int | None
    quantization: dict[str, Any]
    gguf_file: str | None = None
    tokenizer: Any = None  # callable: list[str] -> list[list[int]]
    tokenizer_files: list[str] = field(default_factory=list)
    eos_id: int | None = None


def _find_gguf(path: str, gguf_file: str | None) -> str | None:
    if gguf_file:
        return gguf_file
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        found = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(found) == 1:
            return os.path.basename(found[0])
        if len(found) > 1:
            raise ValueError(f"{path} holds {len(found)} .gguf files; choose one with --gguf-file")
    return None


def _gguf_quant_type(name: str) -> str | None:
    import re

    m = re.search(r"\b(I?Q\d[_A-Z0-9]*|F16|BF16|F32)\b", os.path.basename(name).replace(".", " ").upper())
    return m.group(1) if m else None


def load_model(path: str, *, gguf_file: str | None = None, dtype: str = "float32",
               tokenizer_path: str | None = None) -> LoadedModel:
    """Load a tokenbounds GPT directory or a Hugging Face causal LM from a local directory
    (offline: ``HF_HUB_OFFLINE=1``), with its tokenizer when one is present."""
    import torch

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if not os.path.exists(path):
        raise FileNotFoundError(f"--model {path} does not exist (a local directory is required; hubs are offline)")
    cfg_path = os.path.join(path, "config.json")
    cfg = {}
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
    if cfg.get("model_type") == "tokenbounds-gpt":
        from ..models.gpt import GPT

        model = GPT.load(path).to(torch_dtype)
        lm = LoadedModel(model, "tokenbounds-gpt", path, sum(p.numel() for p in model.parameters()),
                         model.config.context_length, {"already_quantized": False})
        tok_file = tokenizer_path or os.path.join(path, "tokenizer.json")
        if os.path.exists(tok_file):
            from tokenizers import Tokenizer

            tk = Tokenizer.from_file(tok_file)
            lm.tokenizer = lambda docs: [e.ids for e in tk.encode_batch(list(docs), add_special_tokens=False)]
            lm.tokenizer_files = [tok_file]
            lm.eos_id = tk.token_to_id("<|endoftext|>")
        return lm
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _find_gguf(path, gguf_file)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": True}
    if gguf:
        kwargs["gguf_file"] = gguf
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    quant: dict[str, Any] = {"already_quantized": False}
    if gguf:
        qt = _gguf_quant_type(gguf)
        gpath = gguf if os.path.isabs(gguf) else os.path.join(path, gguf)
        bits = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q4_K_M": 4, "Q4_K_S": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8,
                "Q2_K": 2, "Q3_K": 3, "Q3_K_M": 3, "Q6_K": 6, "F16": 16, "BF16": 16, "F32": 32}.get(qt or "", None)
        quant = {"already_quantized": bits is not None and bits < 16, "format": "GGUF", "gguf_file": gguf,
                 "gguf_type": qt, "weight_bits": bits, "gguf_bytes": os.path.getsize(gpath),
                 "note": (f"the checkpoint was loaded from a GGUF file of type {qt}: its weights were already "
                          f"quantized to {bits}-bit blocks and were dequantized on load, so re-quantizing it to "
                          f">= {bits} bits is nearly free; its compressed size says little about what a "
                          "quantizer achieves on a full-precision model")
                 if bits is not None and bits < 16 else f"loaded from GGUF ({qt})"}
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
    seen = set()
    n_params = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n_params += p.numel()
    lm = LoadedModel(model, f"hf:{model.config.model_type}", path, n_params, ctx, quant, gguf_file=gguf)
    try:
        tk = AutoTokenizer.from_pretrained(tokenizer_path or path, local_files_only=True,
                                           **({"gguf_file": gguf} if gguf and not tokenizer_path else {}))
    except Exception as exc:  # noqa: BLE001 - no tokenizer is fine for .bin data
        log.info("no tokenizer loaded from %s (%s); .txt/.jsonl data need one", tokenizer_path or path, exc)
        tk = None
    if tk is not None:
        lm.tokenizer = lambda docs: [list(x) for x in tk(list(docs), add_special_tokens=False)["input_ids"]]
        lm.eos_id = tk.eos_token_id if tk.eos_token_id is not None else tk.bos_token_id
        base = tokenizer_path or path
        lm.tokenizer_files = sorted(
            p for p in glob.glob(os.path.join(base, "*"))
            if os.path.basename(p) in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model",
                                       "tokenizer_config.json", "special_tokens_map.json")
        ) or ([os.path.join(path, gguf)] if gguf else [])
    return lm


# ----------------------------------------------------------------------------- data
@dataclass
class DataFile:
    path: str
    source: str
    tokens: np.ndarray
    info: dict[str, Any]


def _read_documents(path: str, text_field: str, eot_text: str | None) -> list[str]:
    if path.endswith(".jsonl"):
        docs = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rec = json.loads(line)
                if isinstance(rec, str):
                    docs.append(rec)
                elif isinstance(rec, dict) and text_field in rec:
                    docs.append(str(rec[text_field]))
                else:
                    raise ValueError(f"{path}:{lineno}: no field {text_field!r} (choose one with --text-field)")
        return docs
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if eot_text and eot_text in text:
        return [d for d in text.split(eot_text) if d.strip()]
    return [text]


def prepare_data(paths: list[str], lm: LoadedModel | None, *, token_dtype: str, eot_id: int,
                 cache_dir: str, text_field: str = "text", eot_text: str | None = "<|endoftext|>",
                 vocab_size: int | None = None) -> list[DataFile]:
    """Memory-map every data file (tokenizing text files once into ``cache_dir``)."""
    from .data import load_tokens, write_tokens

    out = []
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--data {path} does not exist")
        h = _sha256_file(path)
        if path.endswith((".txt", ".jsonl")):
            if lm is None or lm.tokenizer is None:
                raise ValueError(
                    f"{path} is text but the model directory has no tokenizer; pass --tokenizer DIR or "
                    "tokenize it to a .bin token file first"
                )
            tok_fp = hashlib.sha256()
            for p in lm.tokenizer_files:
                tok_fp.update(_sha256_file(p)["sha256"].encode())
            key = hashlib.sha256(json.dumps([h["sha256"], tok_fp.hexdigest(), eot_id, text_field]).encode()).hexdigest()
            dt = np.uint16 if (vocab_size or 65536) <= 65536 else np.uint32
            cached = os.path.join(cache_dir, f"{os.path.basename(path)}.{key[:16]}.{np.dtype(dt).name}.bin")
            if not os.path.exists(cached):
                docs = _read_documents(path, text_field, eot_text)
                ids = lm.tokenizer(docs)
                parts = []
                for d in ids:
                    parts.append(np.array([eot_id], dtype=dt))
                    parts.append(np.asarray(d, dtype=dt))
                parts.append(np.array([eot_id], dtype=dt))
                write_tokens(cached, np.concatenate(parts))
            tokens = load_tokens(cached, np.dtype(dt).name)
            info = {"path": os.path.abspath(path), **{k: h[k] for k in ("sha256", "bytes", "method")},
                    "format": "text" if path.endswith(".txt") else f"jsonl[{text_field}]",
                    "tokenized_to": os.path.abspath(cached), "tokenizer_sha256": tok_fp.hexdigest(),
                    "n_tokens": int(tokens.size), "dtype": np.dtype(dt).name}
        else:
            tokens = load_tokens(path, token_dtype)
            info = {"path": os.path.abspath(path), **{k: h[k] for k in ("sha256", "bytes", "method")},
                    "format": "bin", "n_tokens": int(tokens.size), "dtype": token_dtype}
        if tokens.size < 2:
            raise ValueError(f"{path} holds {tokens.size} tokens; at least 2 are needed")
        out.append(DataFile(path, info["format"], tokens, info))
    return out


class MultiTokens:
    """A virtual concatenation of memory-mapped token files (global positions)."""

    def __init__(self, files: list[np.ndarray]):
        self.files = files
        self.offsets = np.cumsum([0] + [int(f.size) for f in files]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def file_of(self, positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, positions, side="right") - 1

    def slice(self, start: int, stop: int) -> np.ndarray:
        f = int(self.file_of(np.array([start]))[0])
        o = int(self.offsets[f])
        return np.asarray(self.files[f][start - o : stop - o])

    def take(self, positions: np.ndarray) -> np.ndarray:
        fi = self.file_of(positions)
        out = np.empty(positions.size, dtype=np.int64)
        for f in np.unique(fi):
            sel = fi == f
            out[sel] = np.asarray(self.files[f][positions[sel] - self.offsets[f]], dtype=np.int64)
        return out


def _eot_positions(tokens: np.ndarray, eot_id: int, chunk: int = 1 << 26) -> np.ndarray:
    parts = [np.flatnonzero(np.asarray(tokens[i : i + chunk]) == eot_id) + i for i in range(0, tokens.size, chunk)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


@dataclass(frozen=True)
class Sample:
    positions: np.ndarray  # global int64 [s]
    starts: np.ndarray  # global int64 [s]
    seed: int
    population: int  # m
    context_length: int
    eot_id: int | None

    @property
    def context_lengths(self) -> np.ndarray:
        return self.positions - self.starts

    def digest(self) -> str:
        return positions_digest(self.positions, self.starts)

    def to_dict(self) -> dict[str, Any]:
        lengths = self.context_lengths
        return {"num_samples": int(self.positions.size), "population_tokens": self.population,
                "with_replacement": True, "seed": self.seed,
                "rng": "numpy.random.default_rng(seed) (PCG64), integers(0, m, size=s) -> position",
                "context_length": self.context_length, "eot_id": self.eot_id,
                "cross_documents": self.eot_id is None,
                "mean_context_tokens": float(lengths.mean()) if lengths.size else 0.0,
                "positions_sha256": self.digest()}


def draw_sample(data: MultiTokens, num_samples: int, *, context_length: int, seed: int,
                eot_id: int | None) -> Sample:
    """Uniform positions with replacement over the m data points (see the module docstring)."""
    if num_samples < 1:
        raise ValueError(f"--sample-tokens must be >= 1, got {num_samples}")
    if context_length < 1:
        raise ValueError(f"--context-length must be >= 1, got {context_length}")
    sizes = np.array([f.size for f in data.files], dtype=np.int64)
    per_file = sizes - 1
    cum = np.concatenate([[0], np.cumsum(per_file)])
    m = int(cum[-1])
    rng = np.random.default_rng(int(seed))
    u = rng.integers(0, m, size=int(num_samples), dtype=np.int64)
    f = np.searchsorted(cum, u, side="right") - 1
    positions = data.offsets[f] + (u - cum[f]) + 1
    starts = np.maximum(positions - int(context_length), data.offsets[f])
    if eot_id is not None:
        for fi in np.unique(f):
            sel = f == fi
            eot = _eot_positions(data.files[fi], eot_id) + data.offsets[fi]
            k = np.searchsorted(eot, positions[sel], side="left") - 1
            last = np.where(k >= 0, eot[np.maximum(k, 0)], data.offsets[fi]) if eot.size else np.full(sel.sum(), data.offsets[fi])
            starts[sel] = np.maximum(starts[sel], last)
    return Sample(positions, starts, int(seed), m, int(context_length), eot_id)


# ----------------------------------------------------------------------------- statistics
def position_edges(context_length: int, buckets: int = POS_BUCKETS) -> np.ndarray:
    """Bucket edges over context lengths 1..L: [e_0=1, e_1, ..., e_n=L+1) (geometric when L > buckets)."""
    if context_length <= buckets:
        return np.arange(1, context_length + 2, dtype=np.int64)
    return np.unique(np.round(np.geomspace(1, context_length + 1, buckets + 1)).astype(np.int64))


@dataclass
class EvalState:
    """Mergeable evaluation state: :class:`LossStats`, a fixed-bin histogram of the unsmoothed loss
    -log2 p_y (integer counts, exact under merging), and per context-length bucket the count and
    float64 sums of the smoothed losses (per alpha) and of the unsmoothed loss."""

    stats: LossStats
    edges: np.ndarray
    hist: np.ndarray = None  # type: ignore[assignment]
    pos_count: np.ndarray = None  # type: ignore[assignment]
    pos_sum_bits: np.ndarray = None  # type: ignore[assignment]
    pos_nll_sum_bits: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        nb, na = len(self.edges) - 1, len(self.stats.alphas)
        if self.hist is None:
            self.hist = np.zeros(HIST_BINS + 1, dtype=np.int64)
        if self.pos_count is None:
            self.pos_count = np.zeros(nb, dtype=np.int64)
        if self.pos_sum_bits is None:
            self.pos_sum_bits = np.zeros((nb, na), dtype=np.float64)
        if self.pos_nll_sum_bits is None:
            self.pos_nll_sum_bits = np.zeros(nb, dtype=np.float64)

    @classmethod
    def empty(cls, alphas, vocab_size: int, context_length: int) -> EvalState:
        return cls(LossStats(alphas=tuple(alphas), vocab_size=vocab_size), position_edges(context_length))

    def update(self, losses, context_lengths: np.ndarray) -> EvalState:
        from ..losses import _to_numpy

        self.stats.update(losses)
        valid = _to_numpy(losses.valid).astype(bool)
        nll = _to_numpy(losses.nll_bits).astype(np.float64)[valid]
        bits = -_to_numpy(losses.logp).astype(np.float64)[valid] / math.log(2.0)
        ctx = np.asarray(context_lengths)[valid]
        width = HIST_MAX_BITS / HIST_BINS
        idx = np.where(np.isfinite(bits) & (bits < HIST_MAX_BITS), np.floor(np.maximum(bits, 0) / width), HIST_BINS)
        self.hist += np.bincount(idx.astype(np.int64), minlength=HIST_BINS + 1)
        b = np.searchsorted(self.edges, ctx, side="right") - 1
        nb = len(self.edges) - 1
        self.pos_count += np.bincount(b, minlength=nb)
        for j in range(nll.shape[1]):
            self.pos_sum_bits[:, j] += np.bincount(b, weights=nll[:, j], minlength=nb)
        self.pos_nll_sum_bits += np.bincount(b, weights=bits, minlength=nb)
        return self

    def merge(self, other: EvalState) -> EvalState:
        """In place: self followed by other (the order matters only at float rounding)."""
        if not np.array_equal(self.edges, other.edges):
            raise ValueError("cannot merge EvalStates with different context-length buckets")
        self.stats.merge(other.stats, inplace=True)
        self.hist += other.hist
        self.pos_count += other.pos_count
        self.pos_sum_bits += other.pos_sum_bits
        self.pos_nll_sum_bits += other.pos_nll_sum_bits
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"loss_stats": self.stats.state_dict(), "edges": self.edges.tolist(),
                "hist": self.hist.tolist(), "pos_count": self.pos_count.tolist(),
                "pos_sum_bits": self.pos_sum_bits.tolist(), "pos_nll_sum_bits": self.pos_nll_sum_bits.tolist()}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> EvalState:
        na = len(d["loss_stats"]["alphas"])
        return cls(LossStats.from_state_dict(d["loss_stats"]), np.array(d["edges"], dtype=np.int64),
                   np.array(d["hist"], dtype=np.int64), np.array(d["pos_count"], dtype=np.int64),
                   np.array(d["pos_sum_bits"], dtype=np.float64).reshape(-1, na),
                   np.array(d["pos_nll_sum_bits"], dtype=np.float64))

    def histogram_dict(self) -> dict[str, Any]:
        return {"quantity": "unsmoothed loss -log2 p_y (bits)", "bin_width_bits": HIST_MAX_BITS / HIST_BINS,
                "range_bits": [0.0, HIST_MAX_BITS], "counts": self.hist[:-1].tolist(),
                "overflow": int(self.hist[-1])}

    def by_position_dict(self) -> dict[str, Any]:
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.pos_sum_bits / self.pos_count[:, None]
            nll = self.pos_nll_sum_bits / self.pos_count
        return {"context_tokens_from": self.edges[:-1].tolist(), "context_tokens_to": (self.edges[1:] - 1).tolist(),
                "count": self.pos_count.tolist(),
                "mean_bits": [[None if not np.isfinite(v) else float(v) for v in row] for row in mean],
                "mean_nll_bits": [None if not np.isfinite(v) else float(v) for v in nll]}


# ----------------------------------------------------------------------------- the run
@dataclass
class EvalOptions:
    model: str
    data: list[str]
    sample_tokens: int
    out: str
    seed: int = 0
    context_length: int | None = None
    batch_size: int = 16
    checkpoint_every: int = 8
    cross_documents: bool = False
    eot_id: int | None = None
    token_dtype: str = "uint16"
    text_field: str = "text"
    dtype: str = "float32"
    device: str = "auto"
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    bits: int | None = None
    coded_bits: float | None = None
    bits_per_param: float | None = None
    extra_bits: float = 0.0
    train_tokens: float | None = None
    delta: float = 0.05
    gguf_file: str | None = None
    tokenizer: str | None = None
    restart: bool = False
    progress: bool = True
    threads: int | None = None
    plots: bool = True


def _setup_logging(out: str, world) -> None:
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    log.propagate = False
    name = "evaluate.log" if world.world_size == 1 else f"evaluate.rank{world.rank}.log"
    fh = logging.FileHandler(os.path.join(out, name))
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(fh)
    if world.is_main:
        sh = logging.StreamHandler()
        sh.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(sh)


def _coded_bits(opts: EvalOptions, lm: LoadedModel, quant_size: dict | None) -> dict[str, Any]:
    """C and how it was obtained (report.md states it)."""
    if opts.coded_bits is not None:
        return {"coded_bits": float(opts.coded_bits), "method": "given",
                "description": f"C = {opts.coded_bits:.6g} bits, given by --coded-bits (not verified)"}
    if quant_size is not None:
        return {"coded_bits": float(quant_size["total_bits"]), "method": f"quick_quant {opts.bits}-bit",
                "description": (f"C = {quant_size['total_bits']:.6g} bits: every parameter tensor quantized to a "
                                f"symmetric {opts.bits}-bit uniform grid and range-coded "
                                f"({quant_size['bits_per_parameter']:.3f} bits/parameter incl. scales and config); "
                                "the bound is for the dequantized model that was evaluated"),
                "size": quant_size}
    if opts.bits_per_param is not None:
        c = float(opts.bits_per_param) * lm.num_parameters
        return {"coded_bits": c, "method": f"{opts.bits_per_param:g} bits/parameter",
                "description": (f"C = {opts.bits_per_param:g} bits x {lm.num_parameters:,} parameters = {c:.6g} bits "
                                "(assumed storage, no entropy coding; valid only if the evaluated weights are "
                                f"exactly representable in {opts.bits_per_param:g} bits each)")}
    q = lm.quantization
    if q.get("format") == "GGUF" and q.get("gguf_bytes"):
        c = 8.0 * q["gguf_bytes"]
        return {"coded_bits": c, "method": "GGUF file size",
                "description": (f"C = 8 x {q['gguf_bytes']:,} bytes of the GGUF file = {c:.6g} bits: the file is a "
                                "complete description of the (already quantized) weights and tokenizer")}
    c = 16.0 * lm.num_parameters
    return {"coded_bits": c, "method": "default 16 bits/parameter",
            "description": (f"C = 16 bits x {lm.num_parameters:,} parameters = {c:.6g} bits (assumed bf16/fp16 "
                            "storage, no compression; pass --bits to quantize, --coded-bits or --bits-per-param)")}


def _quantize(lm: LoadedModel, bits: int) -> dict[str, Any]:
    """quick_quant the model in place (b-bit uniform grid + range coding); returns its size."""
    from .quick_quant import (
        QuantizedModel,
        code_length,
        dequantize_into,
        quantize_tensor,
        unique_parameters,
    )

    model = lm.model
    cfg = model.config
    if hasattr(cfg, "to_dict"):
        cfg_dict = cfg.to_dict()
    else:
        from dataclasses import asdict

        cfg_dict = asdict(cfg)
    tensors = [quantize_tensor(p.detach().float().cpu().numpy(), bits, n) for n, p in unique_parameters(model)]
    qm = QuantizedModel(tensors, json.loads(json.dumps(cfg_dict, default=str)), bits)
    qm.size = code_length(qm)
    lm.model = dequantize_into(model, qm)
    return qm.size


def evaluate(opts: EvalOptions) -> dict[str, Any] | None:
    """Run (or resume) an evaluation; returns the stats.json content on rank 0 (None elsewhere)."""
    import torch

    from . import distributed as D
    from .hf import FusedHead

    world = D.init_from_env(opts.device)
    try:
        return _evaluate(opts, world, torch, D, FusedHead)
    finally:
        D.shutdown(world)


def _evaluate(opts, world, torch, D, FusedHead):
    os.makedirs(opts.out, exist_ok=True)
    D.barrier(world)
    _setup_logging(opts.out, world)
    from .runtime import choose_threads

    torch.set_num_threads(choose_threads(opts.threads))
    if opts.batch_size < 1 or opts.checkpoint_every < 1:
        raise ValueError("--batch-size and --checkpoint-every must be >= 1")
    if sum(x is not None for x in (opts.bits, opts.coded_bits, opts.bits_per_param)) > 1:
        raise ValueError("give at most one of --bits, --coded-bits, --bits-per-param")
    if opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", world.local_rank) if torch.cuda.is_available() else None
        if device is None:
            raise ValueError("--device cuda but CUDA is not available")
    else:
        device = torch.device("cpu")
    t_start = time.perf_counter()
    lm = load_model(opts.model, gguf_file=opts.gguf_file, dtype=opts.dtype, tokenizer_path=opts.tokenizer)
    model_fp = directory_fingerprint(opts.model)
    quant_size = _quantize(lm, opts.bits) if opts.bits is not None else None
    lm.model.to(device).eval()
    head = FusedHead(lm.model)
    vocab = head.vocab_size
    eot_id = opts.eot_id if opts.eot_id is not None else (lm.eos_id if lm.eos_id is not None else 0)
    ctx = opts.context_length or min(lm.context_length or 1024, 1024)
    if lm.context_length is not None and ctx > lm.context_length:
        raise ValueError(f"--context-length {ctx} exceeds the model's maximum {lm.context_length}")
    if world.is_main:
        files = prepare_data(opts.data, lm, token_dtype=opts.token_dtype, eot_id=eot_id,
                             cache_dir=os.path.join(opts.out, "tokens"), text_field=opts.text_field,
                             vocab_size=vocab)
    D.barrier(world)
    if not world.is_main:  # text was tokenized by rank 0; now every rank finds it in the cache
        files = prepare_data(opts.data, lm, token_dtype=opts.token_dtype, eot_id=eot_id,
                             cache_dir=os.path.join(opts.out, "tokens"), text_field=opts.text_field,
                             vocab_size=vocab)
    data = MultiTokens([f.tokens for f in files])
    sample = draw_sample(data, opts.sample_tokens, context_length=ctx, seed=opts.seed,
                         eot_id=None if opts.cross_documents else eot_id)
    m = float(opts.train_tokens) if opts.train_tokens is not None else float(sample.population)
    coded = _coded_bits(opts, lm, quant_size)

    lengths = sample.context_lengths
    order_all = np.argsort(-lengths, kind="stable")
    n_batches = math.ceil(order_all.size / opts.batch_size)
    n_blocks = math.ceil(n_batches / opts.checkpoint_every)
    my_blocks = list(range(world.rank, n_blocks, world.world_size))
    config = {
        "format": STATS_FORMAT,
        "model": {"path": os.path.abspath(opts.model), "fingerprint": model_fp["sha256"], "kind": lm.kind,
                  "gguf_file": lm.gguf_file, "dtype": opts.dtype, "quantize_bits": opts.bits},
        "data": [{"path": f.info["path"], "sha256": f.info["sha256"], "n_tokens": f.info["n_tokens"]} for f in files],
        "sample": {"seed": opts.seed, "s": int(opts.sample_tokens), "context_length": ctx,
                   "eot_id": sample.eot_id, "positions_sha256": sample.digest()},
        "batch_size": opts.batch_size, "checkpoint_every": opts.checkpoint_every,
        "alphas": list(map(float, opts.alphas)), "vocab_size": vocab, "world_size": world.world_size,
        "device_type": device.type,
    }
    ckpt_path = os.path.join(opts.out, "checkpoint.json" if world.world_size == 1
                             else f"checkpoint.rank{world.rank}of{world.world_size}.json")
    if opts.restart and os.path.exists(ckpt_path):
        os.remove(ckpt_path)
        log.info("--restart: discarded %s", ckpt_path)
    blocks: dict[int, dict[str, Any]] = {}
    error = None
    try:
        saved = load_checkpoint(ckpt_path, config)
    except CheckpointError as exc:
        error, saved = str(exc), None
    errors = [error]
    if world.distributed:
        import torch.distributed as dist

        errors = [None] * world.world_size
        dist.all_gather_object(errors, error)
    errors = [e for e in errors if e]
    if errors:
        raise CheckpointError(errors[0])
    if saved is not None:
        blocks = {int(k): v for k, v in saved["blocks"].items()}
        log.info("resuming from %s: %d of %d blocks done on this rank", ckpt_path, len(blocks), len(my_blocks))
    if world.is_main:
        log.info("model %s (%s, %s parameters, V=%d), %d data file(s), m=%d, s=%d, context %d, %d batches of %d "
                 "in %d blocks, world size %d, device %s", opts.model, lm.kind, f"{lm.num_parameters:,}", vocab,
                 len(files), sample.population, len(lengths), ctx, n_batches, opts.batch_size, n_blocks,
                 world.world_size, device)
        log.info("coded size: %s", coded["description"])
        if lm.quantization.get("note"):
            log.info("quantization: %s", lm.quantization["note"])

    my_total = int(sum(min(order_all.size, (j + 1) * opts.checkpoint_every * opts.batch_size)
                       - j * opts.checkpoint_every * opts.batch_size for j in my_blocks))
    done_tokens = int(sum(EvalState.from_state_dict(blocks[j]).stats.count for j in blocks)) if blocks else 0
    bar = None
    if opts.progress and world.is_main:
        from tqdm import tqdm

        bar = tqdm(total=my_total, initial=done_tokens, unit="tok", unit_scale=True, dynamic_ncols=True,
                   desc=f"evaluate{' rank 0' if world.distributed else ''}")
    slow = float(os.environ.get("TOKENBOUNDS_TEST_BLOCK_SLEEP_S", "0") or 0)
    t_eval = time.perf_counter()
    new_tokens = 0
    alphas = tuple(map(float, opts.alphas))
    with torch.no_grad():
        for j in my_blocks:
            if j in blocks:
                continue
            state = EvalState.empty(alphas, vocab, ctx)
            for b in range(j * opts.checkpoint_every, min(n_batches, (j + 1) * opts.checkpoint_every)):
                order = order_all[b * opts.batch_size : (b + 1) * opts.batch_size]
                lens = lengths[order]
                inputs = np.zeros((order.size, int(lens.max())), dtype=np.int64)
                for r, k in enumerate(order):
                    inputs[r, : lens[r]] = data.slice(int(sample.starts[k]), int(sample.positions[k]))
                targets = torch.from_numpy(data.take(sample.positions[order])).to(device)
                inp = torch.from_numpy(inputs).to(device)
                hidden = head.hidden_states(inp)
                h = hidden[torch.arange(order.size, device=device), torch.from_numpy(lens - 1).to(device)]
                losses = head.losses(h, targets, alphas)
                state.update(losses, lens)
                new_tokens += order.size
                if bar is not None:
                    bar.update(order.size)
            blocks[j] = state.state_dict()
            nxt = next((k for k in my_blocks if k not in blocks), None)
            save_checkpoint(ckpt_path, config, {
                "blocks": {str(k): v for k, v in sorted(blocks.items())},
                "cursor": {"next_block": nxt, "blocks_done": len(blocks), "blocks_of_rank": len(my_blocks),
                           "tokens_done": int(sum(v["loss_stats"]["count"] for v in blocks.values()))},
                "rng": {"seed": opts.seed, "generator": "numpy PCG64; the sample is redrawn from the seed on "
                        "resume and checked against config.sample.positions_sha256"},
            })
            if slow:
                time.sleep(slow)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t_eval
    log.info("rank %d: evaluated %d new tokens in %.2f s (%.1f tokens/s)", world.rank, new_tokens, elapsed,
             new_tokens / elapsed if elapsed > 0 else float("nan"))

    gathered = D.gather_to_main(world, blocks)
    if not world.is_main:
        return None
    all_blocks: dict[int, dict[str, Any]] = {}
    for part in gathered:
        all_blocks.update({int(k): v for k, v in part.items()})
    if sorted(all_blocks) != list(range(n_blocks)):
        raise RuntimeError(f"missing blocks after gather: have {len(all_blocks)} of {n_blocks}")
    total = EvalState.empty(alphas, vocab, ctx)
    for j in range(n_blocks):
        total.merge(EvalState.from_state_dict(all_blocks[j]))

    from .report import write_outputs

    evaluation = {
        "format": STATS_FORMAT,
        "m": m, "m_source": "given by --train-tokens" if opts.train_tokens is not None
        else "positions with a preceding token in the data files: sum_f (n_f - 1)",
        "s": int(total.stats.count), "vocab_size": vocab, "delta": opts.delta, "extra_bits": opts.extra_bits,
        "alphas": list(alphas), "seed": opts.seed, "sample": sample.to_dict(),
        "model": {"path": os.path.abspath(opts.model), "kind": lm.kind, "class": type(lm.model).__name__,
                  "num_parameters": lm.num_parameters, "fingerprint": model_fp, "dtype": opts.dtype,
                  "quantization": lm.quantization, "quantized_here_bits": opts.bits,
                  "max_context": lm.context_length},
        "data": [f.info for f in files],
        "coded": coded,
        "histogram": total.histogram_dict(),
        "by_position": total.by_position_dict(),
        "run": {"batch_size": opts.batch_size, "checkpoint_every": opts.checkpoint_every, "blocks": n_blocks,
                "world_size": world.world_size, "device": str(device), "config_sha256": config_hash(config),
                "seconds_total": round(time.perf_counter() - t_start, 3), "seconds_eval_this_run": round(elapsed, 3),
                "tokens_this_run_rank0": new_tokens},
        "eval_state": total.state_dict(),
    }
    return write_outputs(opts.out, total, evaluation, plots=opts.plots)
