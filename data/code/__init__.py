"""Code-specific data curation: what turns a language model into a code model.

Modules, one job each:
  hashing      vectorised word-token and word-n-gram hashes for batches of documents
  minhash      MinHash signatures and LSH banding parameters
  dedup        streaming exact (content hash) and near (MinHash-LSH) deduplication
  languages    language detection by file extension
  filters      StarCoder-style quality filters
  pii          redaction of emails, IP addresses and secrets
  decontam     n-gram decontamination against evaluation sets (HumanEval, JSONL problems)
  repo         repository-level documents ordered by Python import dependencies
  fim          fill-in-the-middle permutations (pure functions and grain transforms)
  config       `default_prepare_config()` for `python -m data.prepare` and its validation
  inputs       JSONL(.gz), Parquet and directory-tree readers; bad input as counted drops
  stages       the pure per-file stage chain run in worker processes (or Beam DoFns)
  documents    output documents of the kept files of one group (repository documents)
  report       the report as named counts, shared with the Beam pipeline (`data.curation`)
  shards       ArrayRecord shard writer
  preparation  the local multiprocess driver behind `python -m data.prepare`
"""
