"""The curate stage's steps, as datatrove pipeline steps (the stage itself: `training.stages.curate`).

readers   sources by URI (jsonl, parquet, text, repos, installed packages), shard i of N, bad input marked
steps     bad input set aside, exact dedup, sampled reject files
text      Unicode normalisation, language ID (packaged lid.176), Gopher/C4 quality
code_quality  DeepSeek-Coder's per-file rules: languages, quality, control-token text
code      import graphs, dependency order, repository samples (DeepSeek-Coder §2.2)
repos     repositories (folders, tarballs) read into one sample each
pii       PII and secret redaction, counted per type
decontam  benchmark decontamination (DeepSeek-Coder §2.1)
pack      tokenize + pack into megatron indexed datasets; the merge of every shard
minhash   vectorised MinHash signatures and LSH clustering across shards
chain     one source's pipeline, run by datatrove's executor; the funnel from its stats
funnel    the funnel summed over shards, and its plot
inputs    input fingerprints for the manifest
"""
