"""Curation throughput: our curate chain step by step and whole, against (a) datatrove's stock blocks and (b) a plain
datasketch MinHash-LSH loop, on the same corpus in the same process (1 worker).

    .venv/bin/python benchmarks/curation.py [--mb 30] [--repeat 1] [--workdir DIR] [--stock-docs N]

Corpus: real text that ships on this machine (installed packages' README bodies, then their source files; built by
`benchmarks/minhash_vs_datatrove.py`), with planted near-duplicates and exact copies, written as one JSONL file.
`--mb` below 30 is a quick check only: the official numbers need >= 30 MB (the script says so in its output).

Measured, wall clock and CPU time (`time.process_time`, all threads of this process) from the same run:
- ours: the curate stage's per-source pipeline for a `jsonl` source (`chain.source_pipeline`, a `CurateConfig` with one
  `CurateSource`), each step timed separately by metering its generator (a step's own time = the time spent inside
  its `next()` minus the time spent inside its upstream's), then the merge: MinHash-LSH clustering
  (`minhash.find_duplicates`) and `pack.merge_source`;
- (a) datatrove's stock chain with the equivalent blocks (JsonlReader, FTFYFormatter, language ID, Gopher repetition
  and quality, PIIFormatter, n-gram decontamination, the 4-stage MinHash, DocumentTokenizer), and datatrove's 4-stage
  MinHash alone on the whole corpus;
- (b) a datasketch MinHash + MinHashLSH loop (112 permutations as 14 bands x 8 rows);
- raw HF `tokenizers` `encode_batch_fast` on the texts our tokenize+pack step saw.
"Per core" rates divide by CPU seconds (HF tokenizers encodes on several threads; CPU time counts them all), so
they do not depend on how busy this shared machine is; wall rates are printed next to them.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # `python benchmarks/curation.py` from the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent))

OFFICIAL_MB = 30
TARGETS = {"near-dedup": 4.0, "tokenise+pack": 0.9, "whole chain": 1.0}
ANCHORS = ("anchors (FACTS.md, 36 MB, 3,660 docs, 1 worker): datatrove Gopher+C4 chain 39 docs/s; datatrove 4-stage "
           "MinHash 51 docs/s (98% in signatures); datasketch loop 415 docs/s; DeepSeek tokenizer 392k tokens/s/thread")


# ---------------------------------------------------------------------------------------------------- metering --
@dataclass
class Meter:
    """Inclusive time spent inside a step's generator, and what it yielded (ids and UTF-8 sizes)."""

    name: str
    wall: float = 0.0
    cpu: float = 0.0
    ids: list = field(default_factory=list)
    nbytes: int = 0
    keep_texts: bool = False
    texts: list = field(default_factory=list)


def metered(gen, meter: Meter):
    """Yield from `gen`, adding the time of every `next()` (upstream included) to `meter`."""
    if gen is None:
        return
    it = iter(gen)
    perf, proc = time.perf_counter, time.process_time
    while True:
        w, c = perf(), proc()
        try:
            doc = next(it)
        except StopIteration:
            meter.wall += perf() - w
            meter.cpu += proc() - c
            return
        meter.wall += perf() - w
        meter.cpu += proc() - c
        meter.ids.append(doc.id)
        meter.nbytes += len(doc.text.encode("utf-8", "replace")) if isinstance(doc.text, str) else 0
        if meter.keep_texts:
            meter.texts.append(doc.text)
        yield doc


def _lazy_run(step, data):
    """`step.run` called on first `next()`: terminal steps (MinhashDedupSignature, DocumentTokenizer) are plain
    functions that would otherwise drain their upstream when the chain is built, outside every meter."""
    out = step.run(data, rank=0, world_size=1)
    if out is not None:
        yield from out


@dataclass
class StepResult:
    name: str
    wall: float
    cpu: float
    docs_in: int
    bytes_in: int
    tokens_in: int
    docs_out: int | None = None


def run_metered(steps: list, names: list[str], tokens_of: dict, keep_texts_before: str | None = None,
                data=None) -> list[StepResult]:
    """Chain `steps` (datatrove steps, rank 0 of 1) with a meter after each; drain; per-step exclusive times. A step's
    input is what the previous step yielded (a reader's input is its own output)."""
    meters = [Meter(name) for name in names]
    if keep_texts_before is not None:
        meters[names.index(keep_texts_before) - 1].keep_texts = True
    for step, meter in zip(steps, meters):
        data = metered(_lazy_run(step, data), meter)
    for _ in data:
        pass
    results, before_wall, before_cpu = [], 0.0, 0.0
    for i, meter in enumerate(meters):
        source = meters[i - 1] if i else meter
        results.append(StepResult(meter.name, meter.wall - before_wall, meter.cpu - before_cpu, len(source.ids),
                                  source.nbytes, sum(tokens_of.get(d, 0) for d in source.ids), len(meter.ids)))
        before_wall, before_cpu = meter.wall, meter.cpu
    run_metered.meters = meters
    return results


@contextlib.contextmanager
def timed(result: dict):
    w, c = time.perf_counter(), time.process_time()
    yield
    result["wall"], result["cpu"] = time.perf_counter() - w, time.process_time() - c


@contextlib.contextmanager
def quiet():
    """datatrove logs every step and task to stderr (loguru); only our summary matters here."""
    from datatrove.utils.logging import logger

    logger.remove()
    with contextlib.redirect_stderr(io.StringIO()):
        yield


# ------------------------------------------------------------------------------------------------------ corpus --
def make_corpus(mb: float, planted: int, path: Path):
    from minhash_vs_datatrove import build_corpus, plant_duplicates

    corpus = plant_duplicates(build_corpus(int(mb * 1e6)), planted, planted // 2)
    with open(path, "w") as f:
        for i, text in enumerate(corpus.texts):
            f.write(json.dumps({"id": f"doc{i}", "text": text}, ensure_ascii=False) + "\n")
    return corpus


# -------------------------------------------------------------------------------------------------------- ours --
MARKDOWN_OVERRIDES = {"min_alpha_words_ratio": 0.4, "max_avg_word_length": 12, "c4": False}


def our_config(corpus_path: Path, run_root: Path):
    from training.config.curate import CurateConfig, CurateSource

    # The corpus is package READMEs (Markdown/reST) then source files: the stage's README thresholds
    # (`text.MARKDOWN_PROSE`), as the package_metadata source uses; the paper defaults keep ~1% of READMEs.
    source = CurateSource(kind="jsonl", name="bench", uri=str(corpus_path), max_documents=10**9,
                          quality_overrides=MARKDOWN_OVERRIDES)
    return CurateConfig(sources=[source], run_root=str(run_root)), source


def run_ours(corpus_path: Path, workdir: Path, tokens_of: dict) -> tuple[list[StepResult], list]:
    from training.data.curate import minhash
    from training.data.curate.chain import source_pipeline, step_name
    from training.data.curate.pack import merge_source

    shard = workdir / "ours" / "shard"
    shutil.rmtree(workdir / "ours", ignore_errors=True)
    cfg, source = our_config(corpus_path, workdir / "ours")
    steps = source_pipeline(cfg, source, 0, shard)   # built outside the timing (decontamination index included)
    names = [step_name(s) for s in steps]
    with quiet():
        results = run_metered(steps, names, tokens_of, keep_texts_before="tokenize + pack")
    pack_texts = run_metered.meters[names.index("tokenize + pack") - 1].texts
    packed = run_metered.meters[names.index("tokenize + pack")].ids
    # The merge: clustering over the shard's signatures, then the final dataset.
    nd, t = cfg.near_dedup, {}
    params = minhash.MinhashParams(n_grams=nd.n_grams, num_buckets=nd.num_buckets,
                                   hashes_per_bucket=nd.hashes_per_bucket, seed=nd.seed)
    n_sig = results[-1].docs_out
    with timed(t):
        keys, sigs = minhash.load_signatures(sorted((shard / "minhash" / source.label).glob("*.npz")))
        near = set(minhash.find_duplicates(keys, sigs, params).tolist())
    results.append(StepResult("merge: MinHash-LSH clustering", t["wall"], t["cpu"], n_sig,
                              results[-1].bytes_in, results[-1].tokens_in, n_sig - len(near)))
    with timed(t):
        counts = merge_source(source.label, [shard], workdir / "ours" / "data" / "bench_text_document", set(), near)
    results.append(StepResult("merge: write datasets", t["wall"], t["cpu"], len(packed), 0,
                              sum(tokens_of.get(d, 0) for d in packed), counts["documents"]))
    return results, pack_texts


# --------------------------------------------------------------------------------------------- datatrove stock --
def stock_decont_index(folder: Path, n_grams: int = 10):
    """datatrove's `NGramsDecontIndexer` needs lighteval (not installed, and it downloads its tasks): the same hashes
    (`compute_hashes`: spaCy words of `simplify_text`, n-grams, xxhash) are written from our test strings
    (HumanEval, arith, passkey) into `{task}.index.hashes`, which the stock `NGramsDecontFilter` loads."""
    from datatrove.pipeline.decont.n_grams import NGramsDecontConfig
    from datatrove.utils.hashing import create_hash_func
    from datatrove.utils.text import ngrams, simplify_text
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    from training.data.curate import decontam

    config = NGramsDecontConfig(n_grams=n_grams)
    tokenizer, hash_func = load_word_tokenizer("en"), create_hash_func(config.hash_config)
    strings = {**decontam.humaneval_strings(), **decontam.arith_strings(), **decontam.passkey_strings()}
    hashes: dict[str, set] = {}
    for bench_id, text in strings.items():
        words = tokenizer.word_tokenize(simplify_text(text, config.norm_config))
        hashes.setdefault(bench_id.split("/", 1)[0], set()).update(
            map(hash_func, map(" ".join, ngrams(words, n_grams))))
    folder.mkdir(parents=True, exist_ok=True)
    for task, values in hashes.items():
        np.array(sorted(values), dtype=config.hash_config.np_descr).tofile(folder / f"{task}.index.hashes")
    return config


def run_stock_chain(corpus_path: Path, workdir: Path, tokens_of: dict, limit: int, c4: bool) -> list[StepResult]:
    """Stage 1: read → FTFY → LID → Gopher repetition → Gopher quality (→ C4) → PII → decontamination → write →
    MinHash signatures; stages 2-3: buckets, cluster (LocalPipelineExecutor, 1 worker); stage 4: read → MinHash
    filter → DocumentTokenizer. Our LanguageID (packaged lid.176) stands in for LanguageFilter, which downloads."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.decont.n_grams import NGramsDecontFilter
    from datatrove.pipeline.dedup.minhash import (MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                                  MinhashDedupSignature)
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.formatters import FTFYFormatter, PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.pipeline.writers import JsonlWriter

    from training import tokenizer
    from training.data.curate import text
    from training.data.curate.minhash import MinhashParams

    root = workdir / "stock"
    shutil.rmtree(root, ignore_errors=True)
    decont = stock_decont_index(root / "decont_index")
    mh = MinhashParams().to_datatrove()
    sigs, buckets, remove, filtered = (str(root / n) for n in ("sigs", "buckets", "remove", "filtered"))
    q = text.MARKDOWN_PROSE
    stage1 = [JsonlReader(str(corpus_path.parent), glob_pattern=corpus_path.name, limit=limit),
              FTFYFormatter(),
              text.LanguageID(languages=["en"], threshold=0.65),
              GopherRepetitionFilter(),
              GopherQualityFilter(max_non_alpha_words_ratio=q.min_alpha_words_ratio,
                                  max_avg_word_length=q.max_avg_word_length)]
    names = ["read (JsonlReader)", "FTFYFormatter", "LanguageID (ours: packaged lid.176)", "GopherRepetitionFilter",
             "GopherQualityFilter"]
    if c4:
        stage1.append(C4QualityFilter())
        names.append("C4QualityFilter")
    stage1 += [PIIFormatter(), NGramsDecontFilter(str(root / "decont_index"), config=decont),
               JsonlWriter(filtered, compression=None), MinhashDedupSignature(sigs, config=mh)]
    names += ["PIIFormatter", "NGramsDecontFilter", "JsonlWriter (for stage 4)", "MinhashDedupSignature"]
    with quiet():
        results = run_metered(stage1, names, tokens_of)
        n_sig = results[-1].docs_in
        signed = run_metered.meters[-2]
        for name, pipeline, tasks in (
                ("MinhashDedupBuckets (14 tasks)", [MinhashDedupBuckets(sigs, buckets, config=mh)], mh.num_buckets),
                ("MinhashDedupCluster", [MinhashDedupCluster(buckets, remove, config=mh)], 1)):
            t = {}
            with timed(t):
                LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, skip_completed=False,
                                      logging_dir=str(root / f"logs_{name.split()[0]}")).run()
            results.append(StepResult(name, t["wall"], t["cpu"], n_sig, signed.nbytes,
                                      sum(tokens_of.get(d, 0) for d in signed.ids)))
        stage4 = [JsonlReader(filtered, compression=None), MinhashDedupFilter(remove),
                  DocumentTokenizer(str(root / "tokens"), tokenizer_name_or_path=str(tokenizer.tokenizer_path()),
                                    eos_token=tokenizer.EOD, batch_size=256)]
        results += run_metered(stage4, ["read filtered (JsonlReader)", "MinhashDedupFilter",
                                        "DocumentTokenizer"], tokens_of)
    return results


def run_datatrove_minhash(texts: list[str], workdir: Path) -> tuple[set[int], dict]:
    from minhash_vs_datatrove import run_datatrove

    from training.data.curate.minhash import MinhashParams

    folder = workdir / "dt_minhash"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t = {}
    with quiet(), timed(t):
        removed, _ = run_datatrove(texts, MinhashParams(), folder)
    return removed, t


def run_our_minhash(texts: list[str]) -> tuple[set[int], dict]:
    from training.data.curate.minhash import MinhashParams, find_duplicates, signatures

    params, t = MinhashParams(), {}
    with timed(t):
        keys = np.arange(len(texts), dtype=np.int64)
        removed = set(find_duplicates(keys, signatures(texts, params), params).tolist())
    return removed, t


def run_datasketch(texts: list[str], n_grams: int = 5, bands: int = 14, rows: int = 8) -> tuple[set[int], dict]:
    """The plain loop: words = datatrove's `simplify_text` split on spaces (our `simplify_words`: lowercase, numbers →
    0, punctuation → space, no spaCy), 5-word shingles, MinHash(112 permutations), query, then insert if new."""
    from datasketch import MinHash, MinHashLSH

    from training.data.curate.minhash import simplify_words

    t, removed = {}, set()
    with timed(t):
        lsh = MinHashLSH(num_perm=bands * rows, params=(bands, rows))
        for i, text in enumerate(texts):
            words = simplify_words(text)
            m = MinHash(num_perm=bands * rows, seed=1)
            m.update_batch([" ".join(words[j:j + n_grams]).encode() for j in range(max(len(words) - n_grams + 1, 0))])
            if len(words) >= n_grams and lsh.query(m):
                removed.add(i)
            else:
                lsh.insert(i, m)
    return removed, t


def raw_tokenize(texts: list[str], batch: int) -> tuple[int, dict]:
    from training import tokenizer

    tok, t, n = tokenizer.load_tokenizer(), {}, 0
    with timed(t):
        for start in range(0, len(texts), batch):
            n += sum(len(e.ids) for e in tok.encode_batch_fast(texts[start:start + batch], add_special_tokens=False))
    return n, t


def paired_tokenize_pack(texts: list[str], workdir: Path, pairs: int) -> dict:
    """Raw `encode_batch_fast` (batches of 256, as PackCandidates) and a standalone PackCandidates on the same texts,
    alternated `pairs` times: on a shared machine the CPU cost per token drifts by ±20% over minutes, so only
    back-to-back pairs compare. Returns the median per-pair ratios and the median rates."""
    from datatrove.data import Document

    from training.data.curate.pack import PackCandidates

    ratios_cpu, ratios_wall, raw_rates, pack_rates = [], [], [], []
    for i in range(pairs):
        n, raw = raw_tokenize(texts, 256)
        folder = workdir / "packbench"
        shutil.rmtree(folder, ignore_errors=True)
        step = PackCandidates(folder / "bench", "bench")
        docs = [Document(text=t, id=f"p{j}", metadata={"order": j, "content_key": str(j)}) for j, t in enumerate(texts)]
        packed = {}
        with contextlib.redirect_stdout(io.StringIO()), timed(packed):
            for _ in step.run(iter(docs)):
                pass
        ratios_cpu.append(raw["cpu"] / packed["cpu"])
        ratios_wall.append(raw["wall"] / packed["wall"])
        raw_rates.append(n / raw["cpu"])
        pack_rates.append(n / packed["cpu"])
    med = lambda xs: float(np.median(xs))
    return {"ratio_cpu": med(ratios_cpu), "ratio_wall": med(ratios_wall), "raw_rate": med(raw_rates),
            "pack_rate": med(pack_rates), "ratios_cpu": ratios_cpu, "tokens": n}


# ------------------------------------------------------------------------------------------------------ report --
def rate_line(name: str, docs: int, nbytes: int, tokens: int, wall: float, cpu: float, out=None) -> str:
    def per(x, s):
        return x / s if s > 0 else float("nan")
    return (f"  {name[:38]:<38} {docs:>6} {'' if out is None else out:>6} {wall:8.2f} {cpu:8.2f} "
            f"{per(docs, cpu):9.1f} {per(nbytes, cpu) / 1e6:7.3f} {per(tokens, cpu) / 1e3:9.1f} "
            f"{per(docs, wall):9.1f} {per(nbytes, wall) / 1e6:7.3f}")


HEADER = (f"  {'step':<38} {'in':>6} {'out':>6} {'wall s':>8} {'cpu s':>8} {'docs/s':>9} {'MB/s':>7} "
          f"{'ktok/s':>9} {'docs/s':>9} {'MB/s':>7}\n  {'':<38} {'docs':>6} {'docs':>6} {'':>8} {'':>8} "
          f"{'-- per core (CPU time) --':>27} {'-- wall --':>17}")


def print_steps(title: str, results: list[StepResult], total_docs: int, total_bytes: int, total_tokens: int):
    print(f"\n{title}")
    print(HEADER)
    for r in results:
        print(rate_line(r.name, r.docs_in, r.bytes_in, r.tokens_in, r.wall, r.cpu, r.docs_out))
    wall, cpu = sum(r.wall for r in results), sum(r.cpu for r in results)
    print(rate_line("WHOLE CHAIN (corpus docs / total time)", total_docs, total_bytes, total_tokens, wall, cpu))
    top = max(results, key=lambda r: r.cpu)
    print(f"  dominant step: {top.name} ({top.cpu / cpu:.0%} of CPU time); wall/CPU = {wall / cpu:.2f}")
    return wall, cpu


def median_run(fn, repeat: int, key=lambda r: r):
    runs = [fn() for _ in range(repeat)]
    return sorted(runs, key=key)[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=OFFICIAL_MB, help="real text in MB before planting (>= 30 for "
                                                                       "the official numbers)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each measurement (the median is reported)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--planted", type=int, default=200, help="near-duplicates to plant (plus half as many exact)")
    parser.add_argument("--stock-docs", type=int, default=1500,
                        help="time datatrove's stock chain on the first N documents only (0: all); the corpus is "
                             "shuffled, so they are a random sample. Default 1500 keeps a 30 MB run near 15 min")
    parser.add_argument("--tokenizer-threads", type=int, default=1,
                        help="HF tokenizers' thread pool (RAYON_NUM_THREADS, set before tokenizers starts it). 1 = "
                             "the issue's per-thread anchor; on a busy machine idle pool threads spin and inflate CPU "
                             "time, so more threads make per-core tokens/s unreliable")
    args = parser.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(args.tokenizer_threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if args.tokenizer_threads > 1 else "false"

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="curation-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    corpus_path = workdir / "corpus" / "corpus.jsonl"
    corpus_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"building corpus ({args.mb:g} MB of package READMEs/source files + planted duplicates) in {workdir} ...",
          flush=True)
    corpus = make_corpus(args.mb, args.planted, corpus_path)
    texts = corpus.texts
    n_docs, n_bytes = len(texts), sum(len(t.encode()) for t in texts)
    official = args.mb >= OFFICIAL_MB
    print(f"corpus: {n_docs} docs, {n_bytes / 1e6:.1f} MB, planted {len(corpus.near)} near "
          f"(Jaccard >= {min(corpus.near_jaccard):.2f}) + {len(corpus.exact)} exact copies"
          + ("" if official else f"   ** QUICK CHECK: --mb {args.mb:g} < {OFFICIAL_MB}, NOT the official numbers **"))
    print(ANCHORS)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; tokenizer threads: "
          f"{args.tokenizer_threads}; stock chain timed on "
          f"{'all' if args.stock_docs <= 0 else f'the first {args.stock_docs} (shuffled, so a random sample)'} docs")

    # Warm-ups outside every timing: tokenizer, megatron-core import (~10 s), spaCy, fastText model.
    from training import tokenizer
    from training.data.curate import pack

    tok = tokenizer.load_tokenizer()
    pack.megatron_builder()
    from datatrove.utils.word_tokenizers import load_word_tokenizer
    load_word_tokenizer("en").word_tokenize("warm up")

    # Token count per document id (the DeepSeek tokenizer on the text as read), for tokens/s of every step.
    n_tok_all, t_all = raw_tokenize(texts, 256)
    tokens_of = {f"doc{i}": len(e.ids) for start in range(0, n_docs, 256)
                 for i, e in zip(range(start, n_docs), tok.encode_batch_fast(texts[start:start + 256],
                                                                              add_special_tokens=False))}
    print(f"raw tokenizers on the whole corpus: {n_tok_all:,} tokens, {n_tok_all / t_all['cpu'] / 1e3:.0f}k tokens/s "
          f"per core (CPU), {n_tok_all / t_all['wall'] / 1e3:.0f}k/s wall", flush=True)

    # --- ours: the stage's chain, step by step, then the merge
    print("\nrunning our chain ...", flush=True)
    ours, pack_texts = median_run(lambda: run_ours(corpus_path, workdir, tokens_of), args.repeat,
                                  key=lambda r: sum(s.cpu for s in r[0]))
    ours_wall, ours_cpu = print_steps("OURS: curate stage's per-source chain (jsonl source) + merge", ours, n_docs,
                                      n_bytes, n_tok_all)

    # --- raw tokenizers on the texts our tokenize+pack step saw
    print(f"\ntokenise+pack vs raw tokenizers on the {len(pack_texts)} texts our pack step saw, "
          f"{max(3, args.repeat)} back-to-back pairs ...", flush=True)
    tp = paired_tokenize_pack(pack_texts, workdir, max(3, args.repeat))
    pack_step = next(r for r in ours if r.name == "tokenize + pack")
    print(f"  raw encode_batch_fast {tp['raw_rate'] / 1e3:.0f}k tokens/s per core, PackCandidates "
          f"{tp['pack_rate'] / 1e3:.0f}k (medians); per-pair ratios (CPU) "
          + ", ".join(f"{r:.2f}" for r in tp["ratios_cpu"])
          + f"; in-chain pack step {tp['tokens'] / pack_step.cpu / 1e3:.0f}k tokens/s per core")
    raw_rate, pack_rate = tp["raw_rate"], tp["pack_rate"]

    # --- (a) datatrove's stock chain
    limit = args.stock_docs if 0 < args.stock_docs < n_docs else -1
    stock_docs = n_docs if limit < 0 else limit
    stock_bytes = n_bytes if limit < 0 else sum(len(t.encode()) for t in texts[:limit])
    stock_tokens = n_tok_all if limit < 0 else sum(tokens_of[f"doc{i}"] for i in range(limit))
    print(f"\nrunning datatrove's stock chain on {'all' if limit < 0 else f'the first {limit} of'} {n_docs} docs ...",
          flush=True)
    stock = median_run(lambda: run_stock_chain(corpus_path, workdir, tokens_of, limit, c4=False), args.repeat,
                       key=lambda r: sum(s.cpu for s in r))
    stock_wall, stock_cpu = print_steps(
        "(a) DATATROVE STOCK chain (C4 off as in ours for README prose; LID = our packaged lid.176 on both sides)"
        + ("" if limit < 0 else f" -- SUBSET: first {limit} docs"), stock, stock_docs, stock_bytes, stock_tokens)

    # --- near-dedup alone on the whole corpus: ours, datatrove 4-stage, datasketch
    print("\nrunning near-dedup alone on the whole corpus (ours, datatrove 4-stage, datasketch) ...", flush=True)
    dedup = {}
    dedup["ours (signatures + find_duplicates)"] = median_run(lambda: run_our_minhash(texts), args.repeat,
                                                              key=lambda r: r[1]["cpu"])
    dedup["datatrove 4-stage MinHash"] = median_run(lambda: run_datatrove_minhash(texts, workdir), args.repeat,
                                                    key=lambda r: r[1]["cpu"])
    dedup["datasketch MinHash+LSH loop"] = median_run(lambda: run_datasketch(texts), args.repeat,
                                                      key=lambda r: r[1]["cpu"])
    from minhash_vs_datatrove import planted_recall

    print(HEADER.replace("step", "near-dedup, whole corpus"))
    recall = {}
    for name, (removed, t) in dedup.items():
        recall[name] = (planted_recall(removed, corpus.near), planted_recall(removed, corpus.exact), len(removed))
        print(rate_line(name, n_docs, n_bytes, n_tok_all, t["wall"], t["cpu"], n_docs - len(removed))
              + f"   near recall {recall[name][0]:.3f}, exact recall {recall[name][1]:.3f}")

    # --- ratios
    ours_nd, dt_nd, ds_nd = (dedup[k][1] for k in dedup)
    nd_ratio_cpu, nd_ratio_wall = dt_nd["cpu"] / ours_nd["cpu"], dt_nd["wall"] / ours_nd["wall"]
    ours_docs_cpu, stock_docs_cpu = n_docs / ours_cpu, stock_docs / stock_cpu
    ours_docs_wall, stock_docs_wall = n_docs / ours_wall, stock_docs / stock_wall
    chain_cpu, chain_wall = ours_docs_cpu / stock_docs_cpu, ours_docs_wall / stock_docs_wall
    pack_ratio_cpu, pack_ratio_wall = tp["ratio_cpu"], tp["ratio_wall"]
    recall_ok = recall["ours (signatures + find_duplicates)"][0] >= recall["datatrove 4-stage MinHash"][0] and \
        recall["ours (signatures + find_duplicates)"][1] >= recall["datatrove 4-stage MinHash"][1]

    def verdict(ratio, target, extra=True):
        return "PASS" if ratio >= target and extra else "MISS"

    print("\n" + "=" * 112)
    print(f"TARGETS  ({n_docs} docs, {n_bytes / 1e6:.1f} MB, 1 worker; ratios from CPU time and from wall time of "
          f"the same run{'' if official else '; QUICK CHECK below 30 MB, not official'})")
    print(f"  {'ratio':<58} {'CPU':>7} {'wall':>7} {'target':>7}  verdict (CPU)")
    print(f"  {'near-dedup docs/s: ours / datatrove 4-stage':<58} {nd_ratio_cpu:7.2f} {nd_ratio_wall:7.2f} "
          f"{'>= 4':>7}  {verdict(nd_ratio_cpu, 4.0, recall_ok)}"
          f" (recall ours >= datatrove: {recall_ok})")
    print(f"  {'tokenise+pack tokens/s: PackCandidates / raw tokenizers':<58} {pack_ratio_cpu:7.2f} "
          f"{pack_ratio_wall:7.2f} {'>= 0.9':>7}  {verdict(pack_ratio_cpu, 0.9)}")
    print(f"  {'whole chain docs/s: ours / datatrove stock chain':<58} {chain_cpu:7.2f} {chain_wall:7.2f} "
          f"{'>= 1':>7}  {verdict(chain_cpu, 1.0)}"
          + ("" if limit < 0 else f" (stock timed on the first {limit} docs)"))
    ds_t = ds_nd
    print(f"  {'(info) near-dedup docs/s: ours / datasketch loop':<58} {ds_t['cpu'] / ours_nd['cpu']:7.2f} "
          f"{ds_t['wall'] / ours_nd['wall']:7.2f}")
    print(f"  {'(info) near-dedup docs/s: datasketch / datatrove':<58} {dt_nd['cpu'] / ds_t['cpu']:7.2f} "
          f"{dt_nd['wall'] / ds_t['wall']:7.2f}")
    print(f"  rates per core: near-dedup ours {n_docs / ours_nd['cpu']:.0f}, datatrove {n_docs / dt_nd['cpu']:.0f}, "
          f"datasketch {n_docs / ds_t['cpu']:.0f} docs/s; tokens/s raw {raw_rate / 1e3:.0f}k vs pack "
          f"{pack_rate / 1e3:.0f}k; whole chain ours {ours_docs_cpu:.1f} vs stock {stock_docs_cpu:.1f} docs/s")
    print("  recall (near / exact planted pairs):  " + ";  ".join(
        f"{name.split(' ')[0]} {r[0]:.3f} / {r[1]:.3f} ({r[2]} removed)" for name, r in recall.items()))
    print(f"  wall/CPU: ours chain {ours_wall / ours_cpu:.2f}, stock chain {stock_wall / stock_cpu:.2f}; "
          f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":   # LocalPipelineExecutor may use forkserver: keep module import side-effect free
    main()
