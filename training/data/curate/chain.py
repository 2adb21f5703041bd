"""One source's datatrove pipeline in one shard, and the funnel read back from datatrove's stats.

    read → bad input → normalise → exact dedup → decontamination → [language ID → Gopher/C4 quality]   (prose)
                                                                 → [code file quality]          (package_code files)
         → PII redaction → tokenize (+ fill-in-the-middle, code sources) + pack → MinHash signatures
(`repos` sources apply DeepSeek-Coder's file filters while reading, before files are ordered and concatenated.)

Each filter drops with a reason that datatrove counts in its stats, and keeps samples of what it dropped in
`{shard}/rejects/{source}/{step}/`; decontamination keeps every removed document (with the benchmark id it matched).
Shard `i` of `N` runs the pipeline through datatrove's `LocalPipelineExecutor` as task `i` of `N` tasks, which is how
datatrove spreads one job over machines (`local_rank_offset`); the stats file of that task gives the funnel.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.filters.base_filter import BaseFilter

from training.data.curate.pack import PackCandidates
from training.data.curate.readers import SourceReader
from training.data.curate.steps import ExactDedup, SampledRejects, SetAsideBadInput


class CodeFileQuality(BaseFilter):
    """DeepSeek-Coder §2.1's file rules (line lengths, alphabetic fraction, generated/data files) on per-file
    code documents; `repos` sources apply the same rules inside the repository reader."""

    name = "code quality"

    def __init__(self, exclusion_writer=None):
        super().__init__(exclusion_writer=exclusion_writer)
        from training.data.curate.code_quality import CodeQualityParams

        self.params = CodeQualityParams()

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        from training.data.curate.code_quality import language_of, quality_reject_reason

        language = language_of(doc.id)
        doc.metadata["language"] = language
        reason = quality_reject_reason(doc.id, language, doc.text, self.params) if language else "unknown_language"
        return True if reason is None else (False, reason)


def source_pipeline(cfg, source, source_index: int, shard: Path) -> list:
    """The datatrove steps for `source` (a `CurateSource`) writing into the shard directory `shard`."""
    from training.data.curate import decontam, minhash, pii, text

    def rejects(step: str, limit: int | None = 100) -> SampledRejects:
        folder = re.sub(r"\W+", "_", step.lower()).strip("_")   # "Gopher Repetition" → gopher_repetition
        return SampledRejects(str(shard / "rejects" / source.label / folder), limit=limit)

    steps = [SourceReader(source, source_index),
             SetAsideBadInput(source.min_chars, cfg.vocab_merges, exclusion_writer=rejects("bad_input")),
             text.NormalizeUnicode(),
             ExactDedup(exclusion_writer=rejects("exact_dedup"))]
    if source.decontaminate:   # before language and quality filters: every leak is attributed, whatever else it fails
        steps.append(decontam.DecontaminationFilter(decontam.default_index(benchmarks=cfg.decontamination.benchmarks),
                                                    exclusion_writer=rejects("decontaminated", limit=None)))
    if source.language_codes:
        steps.append(text.LanguageID(languages=source.language_codes, threshold=cfg.language_threshold,
                                     exclusion_writer=rejects("language")))
    if source.prose_quality:
        for step in text.quality_filters(quality_params(source)):
            step.exclusion_writer = rejects(step_name(step))
            steps.append(step)
    if source.kind == "package_code":
        steps.append(CodeFileQuality(exclusion_writer=rejects("code_quality")))
    if source.pii:
        steps.append(pii.RedactPII())
    steps.append(PackCandidates(shard / source.label, source.label, exclusion_writer=rejects("pack"),
                                fim_options=source.fim.model_dump(), vocab_merges=cfg.vocab_merges))
    if source.near_dedup:
        nd = cfg.near_dedup
        steps.append(minhash.MinhashSignatureStep(shard / "minhash" / source.label, minhash.MinhashParams(
            n_grams=nd.n_grams, num_buckets=nd.num_buckets, hashes_per_bucket=nd.hashes_per_bucket, seed=nd.seed)))
    return steps


def quality_params(source):
    """The Gopher/C4 thresholds for a prose source: package READMEs (Markdown) get `MARKDOWN_PROSE`, others the
    papers' values; `quality_overrides` changes single thresholds."""
    from training.data.curate import text

    base = text.MARKDOWN_PROSE if source.kind == "package_metadata" else text.QualityParams()
    try:
        return base.override(**source.quality_overrides)
    except (TypeError, ValueError) as err:
        raise ValueError(f"sources[{source.label}].quality_overrides: {err}") from err


def step_name(step) -> str:
    """A step's name without datatrove's type prefix and emoji: "🔻 - FILTER: 🧪 Decontaminate" → "Decontaminate"."""
    name = re.sub(r"^.*?:\s*", "", str(step.name if hasattr(step, "name") else step))
    return re.sub(r"[^\x20-\x7e]", "", name).strip()


def run_source(cfg, source, source_index: int, shard: Path, index: int) -> tuple[list[dict], dict]:
    """Run the source's pipeline as datatrove task `index` of `cfg.shards`; returns its funnel and PII counts."""
    logs = shard / "logs" / source.label
    executor = LocalPipelineExecutor(pipeline=source_pipeline(cfg, source, source_index, shard), tasks=cfg.shards,
                                     workers=1, local_tasks=1, local_rank_offset=index, logging_dir=str(logs),
                                     skip_completed=False)   # our shard.json marker decides what is done
    executor.run()
    stats = json.loads((logs / "stats" / f"{index:05d}.json").read_text())
    return funnel_from_stats(stats), pii_from_stats(stats)


def pii_from_stats(stats: list[dict]) -> dict[str, int]:
    """Redactions per PII type (the redaction step's `pii_<type>` counters)."""
    found = {}
    for step in stats:
        for key, value in step.get("stats", {}).items():
            if key.startswith("pii_"):
                found[key[len("pii_"):]] = int(value["total"] if isinstance(value, dict) else value)
    return found


def funnel_from_stats(stats: list[dict]) -> list[dict]:
    """Per step: documents and tokens after it, and what it dropped per reason (datatrove's `dropped_*`)."""
    funnel = []
    for step in stats:
        name = step_name(step["name"])
        values = step.get("stats", {})
        count = lambda key: int(values[key]["total"] if isinstance(values.get(key), dict) else values.get(key, 0))
        entry = {"step": name, "documents": None, "tokens": None, "dropped": {}}
        if "forwarded" in values:            # a filter: what it let through, with the tokens (doc_len_tokens)
            entry.update(documents=count("forwarded"), tokens=count("doc_len_tokens"))
            entry["dropped"] = {k[len("dropped_"):]: count(k) for k in values if k.startswith("dropped_")}
        elif name.startswith("read"):
            entry.update(documents=count("documents") + count("bad_input"))   # every item read, bad input too
            skipped = {k[len("skipped_file_"):]: count(k) for k in values if k.startswith("skipped_file_")}
            if skipped:   # files left out of repository samples, per reason
                entry["skipped_files"] = skipped
        else:                                # formatters and the signature step change no counts
            continue
        funnel.append(entry)
    return funnel
