"""Inputs of ``tokenbounds prequential``: the model to train and the rows it is trained and tested on.

Models: a size of the demo's sweep (``S``, ``M``, ``L`` of :data:`tokenbounds.eval.pipeline.
DEMO_CONFIG`), trained from scratch with the data's vocabulary, or a local directory (our GPT or
a Hugging Face causal LM, loaded by :func:`tokenbounds.eval.models.load_model`) as a pretrained
start; optionally with LoRA adapters (:func:`tokenbounds.compress.apply_lora`).

Data: ``.bin`` token files (memory-mapped), ``.txt`` / ``.jsonl`` text (tokenized once with the
model's tokenizer or ``--tokenizer`` by :func:`tokenbounds.eval.data.prepare_data`), or an
offline corpus ``corpus:kjv+shakespeare`` (built and cached by
:func:`tokenbounds.eval.data.build_corpus`; ``scripts/get_corpus.sh`` installs the KJV Bible).
Files are cut into rows of ``T + 1`` tokens (:class:`~tokenbounds.prequential.run.WindowRows`).
The held-out rows are ``--test-data`` or a fixed random subset of the rows (seed
``SPLIT_SEED``), removed from the training rows; with ``max_train_tokens`` the subset is drawn
from the data's first ``max_train_tokens / (1 - test_fraction)`` tokens, the region the training
rows come from (a corpus stored source by source is not stationary).

A tokenizer fingerprint travels with each file (the sha256 of the tokenizer that produced it:
the text tokenizer, the ``tokenizer.json`` next to a ``.bin`` file, the corpus's tokenizer), so
training and test data made by different tokenizers are refused instead of silently scored.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .run import PreparedModel, WindowRows

__all__ = ["SCRATCH_SIZES", "SPLIT_SEED", "Inputs", "ModelSource", "load_inputs", "load_model_source",
           "split_rows"]

SPLIT_SEED = 20240601


def _scratch_sizes() -> dict[str, Any]:
    from ..eval.pipeline import DEMO_CONFIG

    return {s.name: s for s in DEMO_CONFIG.sizes}


SCRATCH_SIZES = ("S", "M", "L")
"""Names accepted by ``--model`` for a GPT trained from scratch (the demo's sizes)."""


def _sha256(path: str) -> str:
    from ..eval.data import file_sha256

    return file_sha256(path)


@dataclass
class ModelSource:
    """Where the model of every seed comes from: ``make(seed, vocab, T)`` -> :class:`PreparedModel`."""

    spec: str
    kind: str  # "scratch" | "pretrained"
    base: Any = None  # the loaded pretrained model (copied per seed)
    tokenizer: Any = None  # callable list[str] -> list[list[int]], or None
    tokenizer_files: list[str] = field(default_factory=list)
    eos_id: int | None = None
    vocab_size: int | None = None
    context_length: int | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer_sha256(self) -> str | None:
        tj = [p for p in self.tokenizer_files if os.path.basename(p) == "tokenizer.json"]
        return _sha256(tj[0]) if tj else None

    def make(self, seed: int, vocab_size: int, context_length: int, *, lora_rank: int | None = None,
             lora_targets: tuple[str, ...] = ("*",)) -> PreparedModel:
        import torch

        if self.kind == "scratch":
            from ..models.gpt import GPT, GPTConfig

            size = _scratch_sizes()[self.spec]
            torch.manual_seed(int(seed))
            model = GPT(GPTConfig(vocab_size=vocab_size, context_length=context_length, n_layer=size.n_layer,
                                  n_head=size.n_head, d_model=size.d_model))
            desc = {"model": f"GPT {self.spec} from scratch", "config": {"n_layer": size.n_layer,
                                                                        "n_head": size.n_head,
                                                                        "d_model": size.d_model}}
        else:
            model = copy.deepcopy(self.base)
            desc = {"model": f"pretrained {self.spec}"}
        model.requires_grad_(True)
        total = sum(p.numel() for p in model.parameters())
        trained = total
        if lora_rank:
            from ..compress import apply_lora, trainable_parameters

            wrapped = apply_lora(model, lora_rank, targets=lora_targets, seed=seed)
            trained = trainable_parameters(model)
            desc["lora"] = {"rank": lora_rank, "targets": list(lora_targets), "layers": len(wrapped)}
        return PreparedModel(model, trained, total, desc)


def load_model_source(spec: str, *, tokenizer_path: str | None = None) -> ModelSource:
    """``S``/``M``/``L`` (from scratch) or a model directory (pretrained)."""
    if spec in SCRATCH_SIZES:
        src = ModelSource(spec=spec, kind="scratch", fingerprint={"scratch": spec})
        if tokenizer_path:
            _attach_tokenizer(src, tokenizer_path)
        return src
    if not os.path.isdir(spec):
        raise ValueError(f"--model {spec!r} is neither a size ({', '.join(SCRATCH_SIZES)}: a GPT trained from "
                         "scratch) nor a model directory")
    from ..eval.models import directory_fingerprint, load_model

    lm = load_model(spec, tokenizer_path=tokenizer_path)
    model = lm.model
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", None)
    return ModelSource(spec=spec, kind="pretrained", base=model, tokenizer=lm.tokenizer,
                       tokenizer_files=list(lm.tokenizer_files), eos_id=lm.eos_id,
                       vocab_size=int(vocab) if vocab else None, context_length=lm.context_length,
                       fingerprint=directory_fingerprint(spec))


def _attach_tokenizer(src: ModelSource, path: str) -> None:
    from tokenizers import Tokenizer

    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(path):
        raise ValueError(f"--tokenizer {path} does not exist (a tokenizer.json of the `tokenizers` package)")
    tk = Tokenizer.from_file(path)
    src.tokenizer = lambda docs: [e.ids for e in tk.encode_batch(list(docs), add_special_tokens=False)]
    src.tokenizer_files = [path]
    src.eos_id = tk.token_to_id("<|endoftext|>")
    src.vocab_size = src.vocab_size or int(tk.get_vocab_size())


@dataclass
class Inputs:
    """The prepared data: training and held-out rows and what they were made from."""

    train: WindowRows
    test: WindowRows
    vocab_size: int
    context_length: int
    info: dict[str, Any]


def _corpus_file(spec: str, cache_dir: str, vocab_size: int | None) -> tuple[str, str]:
    from ..eval.data import build_corpus

    sources = [s for s in spec.split(":", 1)[1].replace(",", "+").split("+") if s]
    corpus = build_corpus(cache_dir, sources, vocab_size or 512)
    return corpus.tokens_path, corpus.tokenizer_path


def _prepare(paths: list[str], src: ModelSource, *, token_dtype: str, cache_dir: str, text_field: str,
             vocab_size: int | None, what: str) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    from ..eval.data import prepare_data

    files: list[np.ndarray] = []
    infos: list[dict[str, Any]] = []
    for path in paths:
        tok_sha = None
        if path.startswith("corpus:"):
            bin_path, tok_path = _corpus_file(path, cache_dir, vocab_size)
            if src.tokenizer is None:
                _attach_tokenizer(src, tok_path)
            tok_sha, path = _sha256(tok_path), bin_path
        elif path.endswith(".bin"):
            side = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer.json")
            tok_sha = _sha256(side) if os.path.exists(side) else None
        elif path.endswith((".txt", ".jsonl")) and src.tokenizer is None:
            raise ValueError(f"{what} {path} is text but there is no tokenizer: pass --tokenizer tokenizer.json "
                             "(or a model directory that holds one), or tokenize it to a .bin file first")
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise ValueError(f"{what} {path} is empty (0 bytes): nothing to train or test on")
        eot = src.eos_id if src.eos_id is not None else 0
        try:
            (df,) = prepare_data([path], tokenizer=src.tokenizer, tokenizer_files=src.tokenizer_files,
                                 token_dtype=token_dtype, eot_id=eot, cache_dir=cache_dir,
                                 text_field=text_field, vocab_size=vocab_size)
        except ValueError as exc:
            raise ValueError(f"{what} {path}: {exc}") from None
        info = dict(df.info)
        if tok_sha is None and path.endswith((".txt", ".jsonl")):
            tok_sha = src.tokenizer_sha256 or info.get("tokenizer_sha256")
        info["tokenizer_sha256"] = tok_sha
        files.append(df.tokens)
        infos.append(info)
    return files, infos


def split_rows(rows: WindowRows, *, fraction: float, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Held-out row indices (a fixed random subset of ``min(fraction * rows, max_tokens / T)`` rows,
    at least 1) and the remaining training row indices in stream order."""
    n = len(rows)
    k = max(1, min(int(math.floor(fraction * n)), max(1, max_tokens // rows.T)))
    if k >= n:
        raise ValueError(f"the data hold only {n} rows of {rows.T} + 1 tokens: too few to hold {k} out; "
                         "add data, lower --context-length or pass --test-data")
    test = np.sort(np.random.default_rng(SPLIT_SEED).choice(n, size=k, replace=False))
    train = np.setdiff1d(np.arange(n), test)
    return test, train


def load_inputs(src: ModelSource, data: list[str], test_data: list[str] | None, *, context_length: int,
                token_dtype: str = "uint16", cache_dir: str, text_field: str = "text",
                vocab_size: int | None = None, test_fraction: float = 0.1, max_test_tokens: int = 65536,
                max_train_tokens: int | None = None) -> Inputs:
    """Tokenize / map the files, split or load the held-out rows, and check that every token id
    fits the model's vocabulary and that train and test data share a tokenizer."""
    if not data:
        raise ValueError("--data names no file")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--test-fraction must lie in (0, 1), got {test_fraction}")
    t = int(context_length)
    vocab_hint = vocab_size or src.vocab_size
    train_files, train_info = _prepare(data, src, token_dtype=token_dtype, cache_dir=cache_dir,
                                       text_field=text_field, vocab_size=vocab_hint, what="--data")
    rows = WindowRows(train_files, t)
    if len(rows) == 0:
        n = sum(len(f) for f in train_files)
        raise ValueError(f"--data holds {n} tokens: not one row of context {t} + 1 tokens; add data or lower "
                         "--context-length")
    if test_data:
        test_files, test_info = _prepare(test_data, src, token_dtype=token_dtype, cache_dir=cache_dir,
                                         text_field=text_field, vocab_size=vocab_hint, what="--test-data")
        test_all = WindowRows(test_files, t)
        if len(test_all) == 0:
            raise ValueError(f"--test-data holds no row of context {t} + 1 tokens")
        k = min(len(test_all), max(1, max_test_tokens // t))
        pick = np.sort(np.random.default_rng(SPLIT_SEED).choice(len(test_all), size=k, replace=False))
        test = test_all.subset(pick)
        train = rows
        tr_sha = {i["tokenizer_sha256"] for i in train_info} - {None}
        te_sha = {i["tokenizer_sha256"] for i in test_info} - {None}
        if tr_sha and te_sha and tr_sha != te_sha:
            raise ValueError(
                "--test-data was made by another tokenizer than --data (tokenizer sha256 "
                f"{sorted(te_sha)[0][:12]}... vs {sorted(tr_sha)[0][:12]}...): tokenize both with the same "
                "tokenizer")
        split = {"held_out": "--test-data", "test_rows": k, "test_rows_available": len(test_all)}
    else:
        test_info = []
        if max_train_tokens is not None:
            # hold out rows of the same region of the data the training rows come from
            region = math.ceil(max(1, int(max_train_tokens) // t) / (1.0 - test_fraction))
            rows = rows.subset(np.arange(min(len(rows), region)))
        test_idx, train_idx = split_rows(rows, fraction=test_fraction, max_tokens=max_test_tokens)
        test, train = rows.subset(test_idx), rows.subset(train_idx)
        split = {"held_out": f"random {len(test_idx)} of {len(rows)} rows (seed {SPLIT_SEED})"
                             + (" of the data's first rows" if max_train_tokens is not None else ""),
                 "test_rows": int(test_idx.size)}
    if max_train_tokens is not None:
        keep = max(0, int(max_train_tokens) // t)
        train = train.subset(np.arange(min(keep, len(train))))
    model_sha = src.tokenizer_sha256
    data_sha = {i["tokenizer_sha256"] for i in train_info + test_info} - {None}
    if src.kind == "pretrained" and model_sha and data_sha and data_sha != {model_sha}:
        raise ValueError("the data were made by another tokenizer than the model's tokenizer.json; tokenize "
                         "them with the model's tokenizer (or pass its text files)")
    hi_train, hi_test = train.max_token() if len(train) else -1, test.max_token()
    if vocab_size is None:
        # no tokenizer: the largest id of the training data (and of a split of the same files)
        vocab_size = src.vocab_size if src.vocab_size else max(hi_train, -1 if test_data else hi_test) + 1
    for name, hi in (("--data", hi_train), ("--test-data" if test_data else "the held-out rows", hi_test)):
        if hi >= vocab_size:
            raise ValueError(
                f"{name} contains token id {hi} but the model's vocabulary has {vocab_size} entries"
                + (" (the largest training id + 1; pass --vocab-size if that is wrong)" if not src.vocab_size
                   and test_data else "")
                + ": tokenized with another tokenizer or vocabulary (or a wrong --token-dtype)?")
    info = {"train_files": train_info, "test_files": test_info, "split": split, "context_length": t,
            "train_rows": len(train), "test_rows": len(test), "vocab_size": int(vocab_size)}
    return Inputs(train=train, test=test, vocab_size=int(vocab_size), context_length=t, info=info)
