"""The scaling study's corpus: an offline mix, cut into chunks and shuffled once with a fixed
seed, so that *every prefix* of the token file is a sample of the same mix.

Each model of the sweep trains on (and is bounded over) its own first ``D = 20 N`` tokens; if the
sources were concatenated in order, the small models would see only the Bible and the large ones
the dictionary, and the sweep would compare different distributions. Chunking first (at line
boundaries, at most :data:`CHUNK_CHARS` characters) keeps the long documents (a Shakespeare play,
a Python docs page) from dominating a small prefix.

Sources (``shared/corpora.md``): ``kjv``, ``shakespeare`` and ``gcide`` through
:func:`tokenbounds.eval.data.load_documents`, plus ``pydocs`` (Debian python3.11-doc: the reST
sources of the Python documentation) read here. The tokenizer is the byte-level BPE of
:func:`tokenbounds.eval.data.train_tokenizer` (its merges are counted in every model's C); the
token file is the nanoGPT layout of :mod:`tokenbounds.eval.data` (``EOT c1 EOT c2 ... EOT``).
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..eval.data import (
    TOKENIZER_MAX_BYTES,
    Corpus,
    CorpusUnavailable,
    encode_documents,
    load_documents,
    tokenizer_description_bits,
    tokenizer_training_documents,
    train_tokenizer,
    write_tokens,
)
from ..eval.fileio import atomic_path, atomic_write_json, file_sha256, read_json, short_hash

__all__ = ["CHUNK_CHARS", "SCALING_SOURCES", "ScalingCorpus", "build_scaling_corpus", "chunk_document",
           "pydocs_documents"]

SCALING_SOURCES = ("kjv", "shakespeare", "gcide", "pydocs")
CHUNK_CHARS = 4000
FORMAT = "tokenbounds.scaling-corpus/1"
PYDOCS_GLOB = "/usr/share/doc/python3.11/html/_sources/**/*.rst.txt"


def pydocs_documents(pattern: str = PYDOCS_GLOB) -> list[str]:
    """The Python 3.11 documentation sources (Debian python3.11-doc), one document per page, in
    sorted path order."""
    paths = sorted(glob.glob(pattern, recursive=True))
    if len(paths) < 100:
        raise CorpusUnavailable(f"the Python docs need the Debian package python3.11-doc ({pattern} matched "
                                f"{len(paths)} files): run scripts/get_corpus.sh --scaling")
    docs = []
    for p in paths:
        with open(p, encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
        if text:
            docs.append(text + "\n")
    return docs


def chunk_document(text: str, max_chars: int = CHUNK_CHARS) -> list[str]:
    """Split ``text`` at line boundaries into pieces of at most ``max_chars`` characters (a single
    longer line is cut inside); every character is kept, in order."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    chunks: list[str] = []
    cur: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:  # a very long line: cut it
            if cur:
                chunks.append("".join(cur))
                cur, size = [], 0
            chunks.append(line[:max_chars])
            line = line[max_chars:]
        if size + len(line) > max_chars and cur:
            chunks.append("".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += len(line)
    if cur:
        chunks.append("".join(cur))
    return [c for c in chunks if c.strip()]


@dataclass
class ScalingCorpus(Corpus):
    """A :class:`~tokenbounds.eval.data.Corpus` whose documents are shuffled chunks; ``chunk_chars``
    and ``shuffle_seed`` say how they were made, ``source_bytes`` how much each source gave."""

    chunk_chars: int = CHUNK_CHARS
    shuffle_seed: int = 0
    source_bytes: dict | None = None


def _documents(sources: Sequence[str], download_dir: str) -> dict[str, list[str]]:
    out = {}
    plain = [s for s in sources if s != "pydocs"]
    if plain:
        out.update(load_documents(plain, download_dir))
    if "pydocs" in sources:
        out["pydocs"] = pydocs_documents()
    return out


def build_scaling_corpus(cache_dir: str, sources: Sequence[str] = SCALING_SOURCES, vocab_size: int = 512, *,
                         chunk_chars: int = CHUNK_CHARS, shuffle_seed: int = 0,
                         tokenizer_max_bytes: int = TOKENIZER_MAX_BYTES, cached_only: bool = False,
                         log=print) -> ScalingCorpus | None:
    """Build (or reuse from ``cache_dir/corpora``) the shuffled-chunk token file of ``sources``.

    Reproducible: the chunks of all sources (in source order, then document order) are permuted
    by ``numpy.random.default_rng(shuffle_seed)``; the tokenizer is trained on every k-th chunk
    of that order (:func:`~tokenbounds.eval.data.tokenizer_training_documents`); ``meta.json`` is
    written last, so a killed build is redone, never half-read. ``cached_only``: return None
    instead of building."""
    sources = list(sources)
    if not sources:
        raise ValueError("sources must name at least one corpus")
    unknown = [s for s in sources if s not in (*SCALING_SOURCES, "tiny")]
    if unknown:
        raise ValueError(f"unknown corpus source(s) {unknown}; choose from {(*SCALING_SOURCES, 'tiny')}")
    recipe = {"format": FORMAT, "sources": sources, "vocab_size": int(vocab_size), "chunk_chars": int(chunk_chars),
              "shuffle_seed": int(shuffle_seed), "tokenizer_max_bytes": int(tokenizer_max_bytes)}
    directory = os.path.join(cache_dir, "corpora", f"scaling-{'+'.join(sources)}-v{vocab_size}-{short_hash(recipe, 10)}")
    meta_path = os.path.join(directory, "meta.json")
    if os.path.exists(meta_path):
        meta = read_json(meta_path)
        meta.pop("format", None)
        corpus = ScalingCorpus(**{**meta, "directory": directory})
        if os.path.getsize(corpus.tokens_path) == corpus.n_tokens * np.dtype(corpus.dtype).itemsize:
            return corpus
        log(f"cached corpus in {directory} is incomplete; rebuilding")
    if cached_only:  # the caller only wants a description of a corpus built before
        return None
    t0 = time.perf_counter()
    by_source = _documents(sources, os.path.join(cache_dir, "downloads"))
    chunks = [c for s in sources for d in by_source[s] for c in chunk_document(d, chunk_chars)]
    order = np.random.default_rng(int(shuffle_seed)).permutation(len(chunks))
    chunks = [chunks[i] for i in order]
    source_bytes = {s: sum(len(d.encode("utf-8")) for d in by_source[s]) for s in sources}
    n_bytes = sum(source_bytes.values())
    log(f"scaling corpus: {len(chunks):,} chunks of <= {chunk_chars} characters, {n_bytes / 1e6:.1f} MB from "
        f"{', '.join(sources)}; training a {vocab_size}-token BPE")
    tok = train_tokenizer(tokenizer_training_documents(chunks, tokenizer_max_bytes), vocab_size)
    ids = encode_documents(tok, chunks, eot_id=0)
    os.makedirs(directory, exist_ok=True)
    with atomic_path(os.path.join(directory, "tokenizer.json")) as tmp:
        tok.save(tmp)
    corpus = ScalingCorpus(directory=directory, sources=sources, vocab_size=int(tok.get_vocab_size()), eot_id=0,
                           n_tokens=int(ids.size), n_documents=len(chunks), n_bytes=int(n_bytes),
                           dtype=str(ids.dtype), tokens_sha256="", tokenizer_bits=tokenizer_description_bits(tok),
                           build_seconds=0.0, chunk_chars=int(chunk_chars), shuffle_seed=int(shuffle_seed),
                           source_bytes=source_bytes)
    write_tokens(corpus.tokens_path, ids)
    corpus.tokens_sha256 = file_sha256(corpus.tokens_path)
    corpus.build_seconds = round(time.perf_counter() - t0, 3)
    atomic_write_json(meta_path, {**corpus.to_dict(), "format": FORMAT})
    log(f"scaling corpus: {corpus.n_tokens:,} tokens ({n_bytes / corpus.n_tokens:.2f} bytes/token) in "
        f"{corpus.build_seconds:.0f} s -> {directory}")
    return corpus
