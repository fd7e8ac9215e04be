"""The ``.tbq`` file: the complete code of a quantized model. Its size in bits is C.

The bound (Lotfi, Kuang et al. 2024, arXiv 2407.18158; ``spec/bounds.md`` section 2) charges
``C + 2 log2 C`` bits for a model described by a prefix-free code of C bits. A ``.tbq`` file is
such a description: everything a decoder needs to rebuild the evaluated state dict bit for bit
(architecture, tensor names and shapes, codebook, bits, Hadamard seeds, range-coded codes,
scales, the few tensors kept in float16), so ``C = 8 * file size`` with nothing left out. Its
length is written inside it, which makes the file self-delimiting.

Layout (integers are unsigned LEB128 varints; arrays little-endian)::

    b"TBQ1"             magic
    varint              the file's total length in bytes (a truncated file is recognised)
    varint              length of the header
    header              zlib-compressed canonical JSON: format, architecture (kind, class,
                        config), quantizer settings, and one entry per state-dict tensor, in
                        state-dict order
    bodies              one per entry that has one, in header order
    32 bytes            sha256 of everything before it

Entries (``"k"`` is the kind):

* ``"q"``: a :class:`~tokenbounds.quant.weight.QuantizedWeight`. Body: for each of its symbol
  streams (uniform: ``codes``; e8: ``coset``, ``coords``, ``last``) the stream's model (symbol
  count, dense flag, alphabet size, alphabet as deltas when not dense, level counts) and its
  range-coded words (:func:`tokenbounds.bounds.coding.encode_symbols`), then the float16
  scales. Fields equal to the file-wide quantizer settings are omitted from the entry.
* ``"raw"``: a tensor kept as it is (norms, biases: float16 when lossless enough). Body: its
  bytes in the stored dtype; decoded to ``dtype`` (the model's dtype).
* ``"tied"``: the same tensor as entry ``"of"`` (a tied LM head); no body.

``coded_bits_detail`` splits C exactly into ``codes_bits`` (range-coder words),
``scales_bits`` (float16 scales), ``side_bits`` (stream models: counts, alphabets, lengths),
``unquantized_bits`` (raw tensors) and ``header_bits`` (magic, lengths, compressed header,
checksum); the parts sum to ``8 * len(file)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

MAGIC = b"TBQ1"
PART_MAGIC = b"TBQP"
FORMAT = "tokenbounds.tbq/1"
CHECKSUM_BYTES = 32
# Entry fields that may be given once for the whole file (quantizer settings) instead of per tensor.
_SHARED_FIELDS = ("codebook", "bits", "method", "incoherence", "group_size", "dtype")
_SHARED_RAW_FIELDS = ("dtype", "store")
_VOLATILE_CONFIG_KEYS = frozenset({
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
    "_attn_implementation_internal", "quantization_config", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict", "torchscript", "architectures", "_experts_implementation",
})

__all__ = [
    "TBQ", "TBQError", "TensorRecord", "apply_tbq", "architecture_of", "atomic_write_bytes",
    "check_architecture", "encode_tbq", "load_tbq", "parse_tbq", "raw_record", "tied_record",
    "weight_record",
]


class TBQError(ValueError):
    """A ``.tbq`` file is not one, is truncated or corrupt, or does not fit the model."""


# ----------------------------------------------------------------------------- bytes
def _varint(n: int) -> bytes:
    n = int(n)
    if n < 0:
        raise ValueError(f"varint needs a non-negative int, got {n}")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _varints(values: Iterable[int]) -> bytes:
    return b"".join(_varint(v) for v in values)


class _Reader:
    def __init__(self, data: bytes | memoryview, what: str):
        self.data = memoryview(data)
        self.pos = 0
        self.what = what

    def _fail(self, why: str):
        raise TBQError(f"{self.what}: {why} at byte {self.pos} (the file is truncated or corrupt)")

    def varint(self) -> int:
        n = shift = 0
        while True:
            if self.pos >= len(self.data):
                self._fail("unexpected end of data in a varint")
            b = self.data[self.pos]
            self.pos += 1
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                return n
            shift += 7
            if shift > 70:
                self._fail("varint too long")

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            self._fail(f"needs {n} more bytes, {len(self.data) - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (tmp + fsync + os.replace + directory fsync)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some filesystems cannot fsync a directory
        pass


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise TBQError(f"unknown dtype {name!r} in the .tbq header")
    return dt


# ----------------------------------------------------------------------------- records
@dataclass
class TensorRecord:
    """One header entry and its body, with the body's bytes split by category."""

    entry: dict[str, Any]
    body: bytes = b""
    parts: dict[str, int] = field(default_factory=dict)  # category -> bytes (codes, side, scales, unquantized)
    info: dict[str, Any] = field(default_factory=dict)  # not coded: proxy loss, seconds (for reports)

    @property
    def name(self) -> str:
        return self.entry["n"]

    def to_bytes(self) -> bytes:
        """A standalone, checksummed copy (the per-layer partial results of a resumable run)."""
        meta = _canonical({"entry": self.entry, "parts": self.parts, "info": self.info})
        blob = PART_MAGIC + _varint(len(meta)) + meta + _varint(len(self.body)) + self.body
        return blob + hashlib.sha256(blob).digest()

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "partial result") -> TensorRecord:
        if len(data) < len(PART_MAGIC) + CHECKSUM_BYTES or data[:4] != PART_MAGIC:
            raise TBQError(f"{what}: not a tokenbounds partial tensor record")
        if hashlib.sha256(data[:-CHECKSUM_BYTES]).digest() != data[-CHECKSUM_BYTES:]:
            raise TBQError(f"{what}: checksum mismatch (corrupt)")
        r = _Reader(data[4:-CHECKSUM_BYTES], what)
        meta = json.loads(bytes(r.take(r.varint())))
        body = bytes(r.take(r.varint()))
        return cls(entry=meta["entry"], body=body, parts={k: int(v) for k, v in meta["parts"].items()},
                   info=meta.get("info", {}))


def _stream_bytes(enc) -> tuple[bytes, bytes]:
    """(side information, words) of one EncodedSymbols."""
    counts = np.asarray(enc.counts, dtype=np.int64)
    side = [_varint(enc.num_symbols), _varint(1 if enc.dense else 0), _varint(counts.size)]
    if not enc.dense:
        values = np.asarray(enc.values, dtype=np.int64)
        side.append(_varints(np.diff(values, prepend=0).tolist()))  # sorted, non-negative: deltas
    side.append(_varints(counts.tolist()))
    words = np.ascontiguousarray(enc.words, dtype="<u4")
    side.append(_varint(words.size))
    return b"".join(side), words.tobytes()


def _read_stream(r: _Reader):
    from ..bounds.coding import EncodedSymbols

    n = r.varint()
    dense = r.varint()
    if dense not in (0, 1):
        r._fail(f"bad stream flag {dense}")
    size = r.varint()
    if size > 2**24:
        r._fail(f"alphabet of {size} levels")
    if dense:
        values = np.arange(size, dtype=np.int64)
    else:
        values = np.cumsum(np.array([r.varint() for _ in range(size)], dtype=np.int64))
    counts = np.array([r.varint() for _ in range(size)], dtype=np.int64)
    if int(counts.sum()) != n:
        r._fail(f"level counts sum to {int(counts.sum())}, not the {n} symbols")
    nwords = r.varint()
    words = np.frombuffer(bytes(r.take(4 * nwords)), dtype="<u4").astype(np.uint32)
    return EncodedSymbols(words=words, num_symbols=n, values=values, counts=counts, dense=bool(dense))


def weight_record(name: str, qw, *, transposed: bool = False) -> TensorRecord:
    """The entry and body of a quantized matrix (``transposed``: the state-dict tensor is
    ``qw.dequantize().T``, e.g. a GPT-2 Conv1D weight [in, out])."""
    payload = qw.encode()
    entry: dict[str, Any] = {"n": name, "k": "q", "s": list(payload["shape"]), "seed": int(payload["seed"])}
    for key in _SHARED_FIELDS:
        entry[key] = payload[key]
    if transposed:
        entry["t"] = True
    entry["streams"] = list(payload["streams"])
    side, words = [], []
    for enc in payload["streams"].values():
        s, w = _stream_bytes(enc)
        side.append(s)
        words.append(w)
    scales = np.ascontiguousarray(payload["scales"], dtype="<f2")
    body = b"".join(side[i] + words[i] for i in range(len(side))) + scales.tobytes()
    parts = {"side": sum(map(len, side)), "codes": sum(map(len, words)), "scales": scales.nbytes}
    return TensorRecord(entry, body, parts)


def raw_record(name: str, tensor: torch.Tensor, store_dtype: torch.dtype | None = None) -> TensorRecord:
    """A tensor kept as it is, stored in ``store_dtype`` (default: its own dtype); decoded back
    to its own dtype."""
    t = tensor.detach().to("cpu").contiguous()
    stored = t if store_dtype is None or store_dtype == t.dtype else t.to(store_dtype).contiguous()
    body = stored.reshape(-1).view(torch.uint8).numpy().tobytes() if stored.numel() else b""
    entry = {"n": name, "k": "raw", "s": list(t.shape), "dtype": _dtype_name(t.dtype), "store": _dtype_name(stored.dtype)}
    return TensorRecord(entry, body, {"unquantized": len(body)})


def tied_record(name: str, of: str) -> TensorRecord:
    return TensorRecord({"n": name, "k": "tied", "of": of}, b"", {})


def _compact_entry(entry: dict[str, Any], shared: dict[str, Any]) -> dict[str, Any]:
    out = dict(entry)
    if out["k"] == "raw":
        for key in _SHARED_RAW_FIELDS:
            if key in shared and out[key] == shared[key]:
                del out[key]
    if out["k"] == "q":
        for key in _SHARED_FIELDS:
            if key in shared and out.get(key) == shared[key]:
                del out[key]
        if out.get("streams") == _default_streams(out.get("codebook", shared.get("codebook"))):
            del out["streams"]
    return out


def _default_streams(codebook: str | None) -> list[str]:
    return ["coset", "coords", "last"] if codebook == "e8" else ["codes"]


def _full_entry(entry: dict[str, Any], shared: dict[str, Any]) -> dict[str, Any]:
    out = dict(entry)
    if out.get("k") == "raw":
        for key in _SHARED_RAW_FIELDS:
            if key not in out:
                if key not in shared:
                    raise TBQError(f"tensor {out.get('n')!r}: no {key!r} in its entry nor in the quantizer settings")
                out[key] = shared[key]
    if out.get("k") == "q":
        for key in _SHARED_FIELDS:
            if key not in out:
                if key not in shared:
                    raise TBQError(f"tensor {out.get('n')!r}: no {key!r} in its entry nor in the quantizer settings")
                out[key] = shared[key]
        out.setdefault("streams", _default_streams(out["codebook"]))
    return out


# ----------------------------------------------------------------------------- encode
def encode_tbq(architecture: dict[str, Any], quantizer: dict[str, Any], records: list[TensorRecord]) -> bytes:
    """Assemble a ``.tbq`` file from the records of every state-dict tensor (in state-dict order).

    ``quantizer`` holds the file-wide settings (bits, codebook, method, incoherence, seed, ...);
    its ``_SHARED_FIELDS`` are omitted from entries that agree with them.
    """
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names in the records")
    known = set()
    for r in records:
        if r.entry["k"] == "tied" and r.entry["of"] not in known:
            raise ValueError(f"{r.name!r} is tied to {r.entry['of']!r}, which does not come before it")
        known.add(r.name)
    shared = {k: quantizer[k] for k in (*_SHARED_FIELDS, *_SHARED_RAW_FIELDS) if k in quantizer}
    entries = []
    for r in records:
        e = _compact_entry(r.entry, shared)
        if r.body:
            e["nb"] = len(r.body)
        entries.append(e)
    header = {"format": FORMAT, "architecture": architecture, "quantizer": quantizer, "tensors": entries}
    hz = zlib.compress(_canonical(header), 9)
    rest = _varint(len(hz)) + hz + b"".join(r.body for r in records)
    total = len(MAGIC) + len(rest) + CHECKSUM_BYTES
    while True:  # the length field counts itself
        size = len(MAGIC) + len(_varint(total)) + len(rest) + CHECKSUM_BYTES
        if size == total:
            break
        total = size
    blob = MAGIC + _varint(total) + rest
    return blob + hashlib.sha256(blob).digest()


# ----------------------------------------------------------------------------- decode
@dataclass(frozen=True)
class TBQ:
    """A parsed ``.tbq`` file. Tensors are decoded on demand (:meth:`state_dict`, :meth:`tensor`)."""

    data: bytes
    header: dict[str, Any]
    entries: list[dict[str, Any]]  # full entries (shared fields filled in), state-dict order
    bodies: dict[str, tuple[int, int]]  # name -> (offset, length) in data
    coded_bits_detail: dict[str, float]
    tensor_bits: dict[str, float]  # bits of each tensor's body (0 for tied)
    source: str = "<bytes>"
    info: dict[str, Any] = field(default_factory=dict, compare=False)  # not coded: how it was made

    # -- what the file says
    @property
    def architecture(self) -> dict[str, Any]:
        return self.header["architecture"]

    @property
    def quantizer(self) -> dict[str, Any]:
        return self.header["quantizer"]

    @property
    def names(self) -> list[str]:
        return [e["n"] for e in self.entries]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        out = {}
        for e in self.entries:
            if e["k"] == "tied":
                out[e["n"]] = out[e["of"]]
            else:  # a transposed matrix ("t") is coded as [out, in] but is [in, out] in the state dict
                out[e["n"]] = tuple(e["s"][::-1]) if e.get("t") else tuple(e["s"])
        return out

    @property
    def tied(self) -> dict[str, str]:
        return {e["n"]: e["of"] for e in self.entries if e["k"] == "tied"}

    @property
    def coded_bits(self) -> float:
        """C: the length of the file in bits (``sum(coded_bits_detail.values())``)."""
        return 8.0 * len(self.data)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def num_parameters(self) -> int:
        """Parameters described (tied tensors counted once)."""
        return int(sum(int(np.prod(e["s"])) for e in self.entries if e["k"] != "tied"))

    # -- decoding
    def _entry(self, name: str) -> dict[str, Any]:
        for e in self.entries:
            if e["n"] == name:
                return e
        raise KeyError(f"{name!r} is not a tensor of {self.source}")

    def _body(self, name: str) -> memoryview:
        off, n = self.bodies[name]
        return memoryview(self.data)[off:off + n]

    def quantized_weight(self, name: str):
        """The :class:`~tokenbounds.quant.weight.QuantizedWeight` of a ``"q"`` entry."""
        from .weight import QuantizedWeight, _padded_size

        e = self._entry(name)
        if e["k"] != "q":
            raise KeyError(f"{name!r} is not a quantized matrix in {self.source} (kind {e['k']!r})")
        r = _Reader(self._body(name), f"{self.source}: tensor {name!r}")
        streams = {s: _read_stream(r) for s in e["streams"]}
        out, inp = e["s"]
        out_p = _padded_size(out, 1, e["incoherence"])
        in_p = _padded_size(inp, 8 if e["codebook"] == "e8" else 1, e["incoherence"])
        groups = 1 if e["group_size"] is None else -(-in_p // int(e["group_size"]))
        scales = np.frombuffer(bytes(r.take(2 * out_p * groups)), dtype="<f2").astype(np.float16).reshape(out_p, groups)
        if r.pos != len(r.data):
            r._fail(f"{len(r.data) - r.pos} unread bytes")
        payload = {"shape": (out, inp), "padded_shape": (out_p, in_p), "codebook": e["codebook"], "bits": e["bits"],
                   "method": e["method"], "incoherence": e["incoherence"], "seed": e["seed"],
                   "group_size": e["group_size"], "dtype": e["dtype"], "scales": scales, "streams": streams}
        try:
            return QuantizedWeight.decode(payload)
        except (ValueError, RuntimeError, OverflowError, AssertionError) as exc:  # constriction asserts
            raise TBQError(f"{self.source}: tensor {name!r} does not decode ({exc}); the file is corrupt") from None

    def tensor(self, name: str) -> torch.Tensor:
        """The decoded state-dict tensor ``name``."""
        e = self._entry(name)
        if e["k"] == "tied":
            return self.tensor(e["of"])
        if e["k"] == "q":
            w = self.quantized_weight(name).dequantize()
            return w.t().contiguous() if e.get("t") else w
        if e["k"] == "raw":
            dtype = _torch_dtype(e["dtype"])
            store = _torch_dtype(e["store"])
            body = self._body(name)
            numel = int(np.prod(e["s"])) if e["s"] else 1
            if len(body) != numel * torch.empty((), dtype=store).element_size():
                raise TBQError(f"{self.source}: tensor {name!r} has {len(body)} bytes for {numel} {store} entries")
            t = torch.frombuffer(bytearray(body), dtype=torch.uint8) if numel else torch.empty(0, dtype=torch.uint8)
            return t.view(store).reshape(e["s"]).to(dtype)
        raise TBQError(f"{self.source}: tensor {name!r} has unknown kind {e['k']!r}")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor decoded, in state-dict order; tied names share one tensor."""
        out: dict[str, torch.Tensor] = {}
        for e in self.entries:
            out[e["n"]] = out[e["of"]] if e["k"] == "tied" else self.tensor(e["n"])
        return out

    def to_quantized_model(self):
        """The codes as a :class:`~tokenbounds.quant.model.QuantizedModel` (layers = "q" entries)."""
        from .model import QuantizedModel

        layers, unq = {}, {}
        transposed = set()
        for e in self.entries:
            if e["k"] == "q":
                layers[e["n"]] = self.quantized_weight(e["n"])
                if e.get("t"):
                    transposed.add(e["n"])
            elif e["k"] == "raw":
                unq[e["n"]] = self.tensor(e["n"]).to(_torch_dtype(e["store"]))
        return QuantizedModel(layers=layers, unquantized=unq, tied=self.tied, config=dict(self.quantizer),
                              transposed=transposed)

    # -- files and models
    def save(self, path: str) -> None:
        """Write the file atomically."""
        atomic_write_bytes(path, self.data)

    def coded_bits_report(self) -> dict[str, Any]:
        """C and its parts, in the shape the evaluation report prints."""
        d = self.coded_bits_detail
        n = self.num_parameters
        q = self.quantizer
        what = (f"{q.get('bits')}-bit {q.get('codebook')} {q.get('method')}"
                + (" + randomized Hadamard" if q.get("incoherence") else ""))
        return {
            "coded_bits": self.coded_bits, "method": "tbq file size",
            "description": (f"C = 8 x {len(self.data):,} bytes of "
                            f"{os.path.basename(self.source) if self.source != '<bytes>' else 'the .tbq'} = "
                            f"{self.coded_bits:,.0f} bits ({self.coded_bits / max(1, n):.3f} bits/parameter, "
                            f"{what}): range-coded codes {d['codes_bits']:,.0f}, scales {d['scales_bits']:,.0f}, "
                            f"stream models {d['side_bits']:,.0f}, float16/kept tensors "
                            f"{d['unquantized_bits']:,.0f}, header + checksum {d['header_bits']:,.0f}; the "
                            "bound is for exactly the decoded weights"),
            "detail": dict(d), "num_parameters": n, "bits_per_parameter": self.coded_bits / max(1, n),
            "file": os.path.abspath(self.source) if self.source != "<bytes>" else None,
            "file_bytes": len(self.data), "sha256": self.sha256, "quantizer": dict(q),
        }

    def build_model(self) -> torch.nn.Module:
        """A fresh model of the file's architecture carrying the decoded weights (the file alone
        describes the model; Hugging Face architectures need ``transformers``)."""
        arch = self.architecture
        if arch.get("kind") == "tokenbounds-gpt":
            from ..models.gpt import GPT, GPTConfig

            model = GPT(GPTConfig(**arch["config"]))
        elif str(arch.get("kind", "")).startswith("hf:"):
            import transformers

            cfg = dict(arch["config"])
            config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
            cls = getattr(transformers, arch["class"], None)
            model = cls(config) if cls is not None else transformers.AutoModelForCausalLM.from_config(config)
        else:
            raise TBQError(f"{self.source}: cannot build a model of kind {arch.get('kind')!r}")
        model.eval()
        apply_tbq(model, self)
        return model


def parse_tbq(data: bytes, source: str = "<bytes>") -> TBQ:
    """Parse and verify a ``.tbq`` file held in memory (see the module docstring for the layout)."""
    data = bytes(data)
    if len(data) < len(MAGIC) or data[:4] != MAGIC:
        raise TBQError(f"{source} is not a .tbq file (it does not start with {MAGIC!r})")
    r = _Reader(data, source)
    r.pos = 4
    total = r.varint()
    if len(data) < total:
        raise TBQError(f"{source} is truncated: {len(data):,} of its {total:,} bytes are present; "
                       "re-run `tokenbounds quantize` or copy the file again")
    if len(data) > total:
        raise TBQError(f"{source} has {len(data) - total:,} bytes after its end ({total:,} bytes); it is corrupt")
    if hashlib.sha256(data[:-CHECKSUM_BYTES]).digest() != data[-CHECKSUM_BYTES:]:
        raise TBQError(f"{source} is corrupt: its sha256 checksum does not match its contents")
    hz = r.take(r.varint())
    try:
        header = json.loads(zlib.decompress(hz))
    except (zlib.error, ValueError) as exc:
        raise TBQError(f"{source}: unreadable header ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise TBQError(f"{source}: header format {header.get('format') if isinstance(header, dict) else None!r}, "
                       f"expected {FORMAT!r} (written by another version of tokenbounds?)")
    try:
        return _index(data, header, r, total, source)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        if isinstance(exc, TBQError):
            raise
        raise TBQError(f"{source}: malformed header ({type(exc).__name__}: {exc})") from None


def _index(data: bytes, header: dict[str, Any], r: _Reader, total: int, source: str) -> TBQ:
    shared = {k: header["quantizer"][k] for k in (*_SHARED_FIELDS, *_SHARED_RAW_FIELDS)
              if k in header.get("quantizer", {})}
    entries, bodies = [], {}
    detail = {"codes_bits": 0.0, "scales_bits": 0.0, "side_bits": 0.0, "unquantized_bits": 0.0}
    tensor_bits = {}
    seen = set()
    for raw in header["tensors"]:
        e = _full_entry(raw, shared)
        e.pop("nb", None)
        name = e["n"]
        if name in seen:
            raise TBQError(f"{source}: tensor {name!r} appears twice")
        if e["k"] == "tied" and e["of"] not in seen:
            raise TBQError(f"{source}: {name!r} is tied to unknown tensor {e['of']!r}")
        seen.add(name)
        nb = int(raw.get("nb", 0))
        bodies[name] = (r.pos, nb)
        r.take(nb)
        tensor_bits[name] = 8.0 * nb
        entries.append(e)
    if r.pos != total - CHECKSUM_BYTES:
        raise TBQError(f"{source}: the bodies end at byte {r.pos}, the checksum starts at {total - CHECKSUM_BYTES}")
    tbq = TBQ(data=data, header=header, entries=entries, bodies=bodies, coded_bits_detail={}, tensor_bits=tensor_bits,
              source=source)
    for e in entries:  # split each body into codes / side / scales without decoding the words
        name = e["n"]
        if e["k"] == "raw":
            detail["unquantized_bits"] += tensor_bits[name]
        elif e["k"] == "q":
            rd = _Reader(tbq._body(name), f"{source}: tensor {name!r}")
            start = 0
            for _ in e["streams"]:
                n_sym, _dense, size = rd.varint(), rd.varint(), rd.varint()
                del n_sym
                for _ in range(size * (1 if _dense else 2)):
                    rd.varint()
                nwords = rd.varint()
                detail["side_bits"] += 8.0 * (rd.pos - start)
                rd.take(4 * nwords)
                detail["codes_bits"] += 32.0 * nwords
                start = rd.pos
            detail["scales_bits"] += 8.0 * (len(rd.data) - rd.pos)
    detail["header_bits"] = 8.0 * len(data) - sum(detail.values())
    object.__setattr__(tbq, "coded_bits_detail", detail)
    return tbq


def load_tbq(path: str) -> TBQ:
    """Read, verify and index a ``.tbq`` file; refuses truncated, corrupt and foreign files."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    return parse_tbq(data, source=path)


# ----------------------------------------------------------------------------- architectures
def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str, sort_keys=True))


def architecture_of(model: torch.nn.Module) -> dict[str, Any]:
    """{"kind", "class", "config"}: what must match for a ``.tbq`` to apply to ``model``."""
    cfg = getattr(model, "config", None)
    cls = type(model).__name__
    if hasattr(model, "hidden_states") and hasattr(model, "lm_head") and not hasattr(model, "base_model"):
        from dataclasses import asdict, is_dataclass

        return {"kind": "tokenbounds-gpt", "class": cls, "config": _jsonable(asdict(cfg)) if is_dataclass(cfg) else {}}
    if cfg is not None and hasattr(cfg, "to_dict"):
        d = {k: v for k, v in cfg.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
        return {"kind": f"hf:{getattr(cfg, 'model_type', 'unknown')}", "class": cls, "config": _jsonable(d)}
    return {"kind": "torch", "class": cls, "config": {}}


def _config_diffs(old: dict, new: dict) -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        if old.get(k, "<absent>") != new.get(k, "<absent>"):
            out.append(f"{k}: file {old.get(k, '<absent>')!r}, model {new.get(k, '<absent>')!r}")
    return out


def check_architecture(model: torch.nn.Module, tbq: TBQ) -> None:
    """Raise :class:`TBQError` naming every difference between ``model`` and the file's model."""
    arch = architecture_of(model)
    want = tbq.architecture
    problems = []
    if arch["kind"] != want.get("kind") or arch["class"] != want.get("class"):
        problems.append(f"model kind {want.get('kind')}/{want.get('class')} in the file, "
                        f"{arch['kind']}/{arch['class']} given")
    problems += _config_diffs(want.get("config", {}), arch["config"])
    sd = model.state_dict()
    shapes = tbq.shapes
    missing = [n for n in shapes if n not in sd]
    extra = [n for n in sd if n not in shapes]
    wrong = [f"{n}: file {shapes[n]}, model {tuple(sd[n].shape)}" for n in shapes if n in sd
             and tuple(sd[n].shape) != tuple(shapes[n])]
    if missing:
        problems.append(f"{len(missing)} tensors of the file are not in the model: {missing[:4]}")
    if extra:
        problems.append(f"{len(extra)} model tensors are not in the file: {extra[:4]}")
    problems += wrong[:6]
    if problems:
        raise TBQError(f"{tbq.source} was made for another architecture ({want.get('kind')}, "
                       f"{len(shapes)} tensors); differences:\n  " + "\n  ".join(problems[:12])
                       + "\npass the model the file was quantized from")


def apply_tbq(model: torch.nn.Module, tbq: TBQ | str) -> dict[str, Any]:
    """Overwrite ``model``'s weights with the decoded ``.tbq`` (a TBQ or a path) after checking
    that it is the file's architecture; returns C and its parts (:meth:`TBQ.coded_bits_report`).

    Works for our GPT and Hugging Face causal LMs. Refuses a model whose parameter dtypes cannot
    hold the decoded values exactly (e.g. bfloat16 parameters for float32 weights), since the
    evaluated weights must be exactly those the file describes.
    """
    if isinstance(tbq, (str, os.PathLike)):
        tbq = load_tbq(str(tbq))
    check_architecture(model, tbq)
    params = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, value in tbq.state_dict().items():
            target = params[name]
            if value.dtype != target.dtype and torch.promote_types(value.dtype, target.dtype) != target.dtype:
                raise TBQError(f"{name}: the file decodes to {value.dtype} but the model holds {target.dtype}, "
                               "which would round the decoded weights; load the model in "
                               f"{value.dtype} (e.g. --dtype {_dtype_name(value.dtype)})")
            target.copy_(value)
    return tbq.coded_bits_report()
