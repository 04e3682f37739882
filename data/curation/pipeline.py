"""The curation of `data.code` as an Apache Beam pipeline: same stages, configuration, outputs.

    read (trees listed on the launcher, files read in parallel; JSONL/Parquet per file)
      -> per-file stages, batched (`stages.FileStages`; the contamination index is a side input)
      -> exact dedup: GroupByKey(content digest, with each copy's MinHash keys); every copy but
                      the earliest is dropped, the earliest's keys go on to near dedup
      -> near dedup: (band key, doc) -> GroupByKey -> candidate pairs (`dedup.bucket_pairs`)
                     -> signatures joined to both ends (two CoGroupByKeys) -> verified edges
                     -> connected components (`components`, large-star/small-star rounds)
                     -> every node but its component's earliest is dropped
      -> CoGroupByKey(group key) of kept files and drop decisions -> PII counts, repository
         documents (`documents`) -> sharded ArrayRecord files, records in input order per shard
    counts: Beam metrics named as in `data.code.report`, read back into the same report.json.

The decisions are those of the local driver (`data.code.preparation`, see `data.code.dedup`), so
both give the same documents and the same report; only the shard boundaries differ (records are
spread over ceil(records / records_per_shard) or more shards by a hash of their order).
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
import ml_collections
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from data.code import config as config_lib
from data.code import dedup, documents, inputs, preparation, shards, stages
from data.code import report as report_lib
from data.curation import beam_io
from data.curation.components import ConnectedComponents


class _FileStagesFn(beam.DoFn):
    """A batch of `InputFile`s -> kept files keyed by group key (main output), and the dedup
    keys of each, `_Keys` = (doc, group key, signature bytes, band keys): 'digests'
    (digest, _Keys) when exact dedup is on, else 'survivors' (_Keys)."""

    def __init__(self, config: dict[str, Any], tokenizer: Any | None):
        self.config = config
        self.tokenizer = tokenizer
        self._stages: stages.FileStages | None = None
        self._index: Any = None

    def setup(self) -> None:
        self.count = beam_io.Counter()

    def process(self, batch: list[inputs.InputFile], index: Any) -> Iterator:
        if self._stages is None or self._index is not index:
            self._stages, self._index = stages.FileStages(self.config, index, self.tokenizer), index
        readable = []
        for item in batch:
            if item.record is None:
                report_lib.dropped(self.count, "read", item.size, item.drop_reason)
            else:
                readable.append(item)
        exact, near = self.config["exact_dedup"]["enabled"], self.config["near_dedup"]["enabled"]
        for item, outcome in zip(readable, self._stages([item.record for item in readable])):
            report_lib.passed(self.count, "read", item.size, outcome.size)
            if not stages.count_filter_stages(self.count, outcome):
                continue
            kept = documents.KeptFile(item.doc_id, item.group, outcome.record, outcome.redacted_size, outcome.imports, outcome.tokens)
            key = documents.group_key(kept, self.config["repo"]["enabled"])
            yield key, (kept, outcome.size, outcome.pii_counts)
            keys = (item.doc_id, key, outcome.signature.tobytes(), outcome.band_keys.tolist()) if near else (item.doc_id, key, None, None)
            if exact:
                yield beam.pvalue.TaggedOutput("digests", (outcome.digest, keys))
            elif near:
                yield beam.pvalue.TaggedOutput("survivors", keys)


def _exact_dedup(digest_members: tuple[bytes, Iterable[tuple]]) -> Iterator:
    """The earliest copy's keys (main output: survivors); 'drops' (group key, (doc, 'exact', None))
    for the other copies."""
    _, members = digest_members
    first, *copies = sorted(members, key=lambda keys: keys[0])
    yield first
    for doc_id, key, _, _ in copies:
        yield beam.pvalue.TaggedOutput("drops", (key, (doc_id, "exact", None)))


def _band_keys(keys: tuple) -> Iterator[tuple[int, int]]:
    doc_id, _, _, band_keys = keys
    for band_key in band_keys:
        yield band_key, doc_id


def _signature(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint32)


def _to_earlier(joined: tuple[int, dict[str, list]]) -> Iterator[tuple[int, tuple[int, bytes, str]]]:
    member, groups = joined
    for signature, key in list(groups["signature"])[:1]:
        for first in set(groups["earlier"]):
            yield first, (member, signature, key)


class _VerifiedEdges(beam.DoFn):
    """(earlier, {signature, members}) -> edges (earlier, member) of near duplicates, and
    'nodes' (doc, group key) for both ends."""

    def __init__(self, threshold: float, verify: bool):
        self.threshold = threshold
        self.verify = verify

    def process(self, joined: tuple[int, dict[str, list]]) -> Iterator:
        first, groups = joined
        for signature, key in list(groups["signature"])[:1]:
            emitted = False
            for member, member_signature, member_key in groups["members"]:
                if dedup.is_near_duplicate(_signature(signature), _signature(member_signature), self.threshold, self.verify):
                    yield first, member
                    yield beam.pvalue.TaggedOutput("nodes", (member, member_key))
                    emitted = True
            if emitted:
                yield beam.pvalue.TaggedOutput("nodes", (first, key))


def _near_drops(joined: tuple[int, dict[str, list]]) -> Iterator[tuple[str, tuple[int, str, int]]]:
    node, groups = joined
    for representative in list(groups["label"])[:1]:
        yield next(iter(groups["key"])), (node, "near", representative)


class _AssembleFn(beam.DoFn):
    """(group key, {files, drops}) -> ((first doc of the group, n), JSON bytes) per output record;
    'representatives': the kept document of each near-duplicate dropped here."""

    def __init__(self, repository_documents: bool, tokenizer: Any | None, rounds: int):
        self.repository_documents = repository_documents
        self.tokenizer = tokenizer
        self.rounds = rounds

    def setup(self) -> None:
        self.count = beam_io.Counter()

    def process(self, grouped: tuple[str, dict[str, list]], unconverged: int) -> Iterator:
        if unconverged:
            raise RuntimeError(
                f"near-duplicate components: {unconverged} nodes unconverged after near_dedup.cc_rounds={self.rounds}; raise it"
            )
        _, groups = grouped
        decided: dict[int, tuple[str, int | None]] = {}
        for doc_id, kind, representative in groups["drops"]:
            if kind == "exact" or doc_id not in decided:
                decided[doc_id] = (kind, representative)
        kept = []
        for file, size, pii_counts in groups["files"]:
            kind, representative = decided.get(file.doc_id, (None, None))
            if kind == "near":
                yield beam.pvalue.TaggedOutput("representatives", representative)
            if stages.count_dedup_and_pii(self.count, size, file.redacted_size, pii_counts, kind):
                kept.append(file)
        if not kept:
            return
        first = min(file.doc_id for file in kept)
        for number, record in enumerate(documents.documents(kept, self.repository_documents, self.tokenizer, self.count)):
            data = shards.serialize(record)
            documents.count_output(self.count, record, len(data))
            yield (first, number), data


class _Measure(beam.DoFn):
    """Counts the pickled bytes of the elements entering a shuffle (benchmarks only)."""

    def __init__(self, name: str):
        self.name = name

    def setup(self) -> None:
        self.count = beam_io.Counter()

    def process(self, element: Any) -> Iterator:
        self.count(f"shuffle/{self.name}", len(pickle.dumps(element, protocol=pickle.HIGHEST_PROTOCOL)))
        yield element


def _sum_pairs(pairs: Iterable[tuple[int, int]]) -> tuple[int, int]:
    records = size = 0
    for count, nbytes in pairs:
        records += count
        size += nbytes
    return records, size


def build(
    pipeline: beam.Pipeline,
    items: Sequence[inputs.Input],
    config: ml_collections.ConfigDict,
    index: Any,
    tokenizer: Any | None,
    output_dir: str,
    measure_shuffle: bool = False,
) -> None:
    """Adds the curation of `items` to `pipeline`, writing shards to `output_dir`."""

    def shuffled(pcollection: beam.PCollection, name: str) -> beam.PCollection:
        return pcollection | f"measure {name}" >> beam.ParDo(_Measure(name)) if measure_shuffle else pcollection

    exclude = config_lib.split_list(config.read.exclude)
    fields = inputs.parse_fields(config.read.fields)
    sources = []
    tree_files = [f for item in items if item.kind == "tree" for f in inputs.list_repository_tree(item.path, item.index, exclude, config.read.single_repo)]
    if tree_files:
        sources.append(
            pipeline
            | "tree files" >> beam.Create(tree_files, reshuffle=False)
            | "spread tree files" >> beam.Reshuffle()
            | "read tree files" >> beam.Map(inputs.read_tree_file, config.read.max_file_bytes)
        )
    record_files = [item for item in items if item.kind != "tree"]
    if record_files:
        records = (
            pipeline
            | "record files" >> beam.Create(record_files, reshuffle=False)
            | "spread record files" >> beam.Reshuffle()
            | "read records" >> beam.ParDo(beam_io.ReadRecords(fields, config.read.max_file_bytes))
        )
        sources.append(shuffled(records, "spread records") | "spread records" >> beam.Reshuffle())
    files = tuple(sources) | "all inputs" >> beam.Flatten()
    index_side = beam.pvalue.AsSingleton(pipeline | "contamination index" >> beam.Create([index], reshuffle=False))
    staged = (
        files
        | "batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=config.batch_files)
        | "per-file stages" >> beam.ParDo(_FileStagesFn(config.to_dict(), tokenizer), index_side).with_outputs("digests", "survivors", main="files")
    )
    decisions = []
    survivors = staged.survivors
    if config.exact_dedup.enabled:
        exact = (
            shuffled(staged.digests, "exact digests")
            | "exact: by digest" >> beam.GroupByKey()
            | "exact: earliest copy" >> beam.FlatMap(_exact_dedup).with_outputs("drops", main="survivors")
        )
        decisions.append(exact.drops)
        survivors = exact.survivors
    unconverged = pipeline | "no components" >> beam.Create([0], reshuffle=False)
    if config.near_dedup.enabled:
        candidates = config.near_dedup.candidates
        pairs = (
            shuffled(survivors | "near: band keys" >> beam.FlatMap(_band_keys), "near band keys")
            | "near: by band key" >> beam.GroupByKey()
            | "near: candidate pairs" >> beam.FlatMap(lambda bucket: dedup.bucket_pairs(bucket[1], candidates))
            | "near: distinct pairs" >> beam.Distinct()
            | "near: by later" >> beam.Map(lambda pair: (pair[1], pair[0]))
        )
        signatures = shuffled(survivors | "near: signatures" >> beam.Map(lambda keys: (keys[0], (keys[2], keys[1]))), "near signatures")
        to_earlier = (
            {"signature": signatures, "earlier": shuffled(pairs, "near pairs")}
            | "near: join later" >> beam.CoGroupByKey()
            | "near: to earlier" >> beam.FlatMap(_to_earlier)
        )
        edges = (
            {"signature": signatures, "members": shuffled(to_earlier, "near pair signatures")}
            | "near: join earlier" >> beam.CoGroupByKey()
            | "near: verify" >> beam.ParDo(_VerifiedEdges(config.near_dedup.threshold, config.near_dedup.verify)).with_outputs("nodes", main="edges")
        )
        labels, unconverged = shuffled(edges.edges, "near edges") | "near: components" >> ConnectedComponents(config.near_dedup.cc_rounds)
        decisions.append(
            {"label": labels, "key": shuffled(edges.nodes, "near nodes")}
            | "near: join keys" >> beam.CoGroupByKey()
            | "near: drops" >> beam.FlatMap(_near_drops)
        )
    drops = tuple(decisions) | "all drops" >> beam.Flatten() if decisions else pipeline | "no drops" >> beam.Create([], reshuffle=False)
    assembled = (
        {"files": shuffled(staged.files, "kept files"), "drops": shuffled(drops, "drops")}
        | "by group" >> beam.CoGroupByKey()
        | "documents" >> beam.ParDo(
            _AssembleFn(config.repo.enabled, tokenizer, config.near_dedup.cc_rounds), beam.pvalue.AsSingleton(unconverged)
        ).with_outputs("representatives", main="records")
    )
    _ = (
        assembled.representatives
        | "near: clusters" >> beam.Distinct()
        | "count clusters" >> beam.Map(lambda _: beam_io.Counter()("duplicates/near_clusters", 1))
    )
    output = assembled.records
    num_shards = (
        output
        | "sizes" >> beam.Map(lambda record: (1, len(record[1])))
        | "totals" >> beam.CombineGlobally(_sum_pairs)
        | "shard count" >> beam.Map(lambda totals: beam_io.shard_count(*totals, config.output.records_per_shard, config.output.max_shard_bytes))
    )
    shard_side = beam.pvalue.AsSingleton(num_shards)
    every_shard = num_shards | "every shard" >> beam.FlatMap(lambda n: [(shard, None) for shard in range(n)])
    keyed = output | "to shards" >> beam.Map(lambda record, n: (beam_io.shard_of(record[0], n), record), shard_side)
    _ = (
        (shuffled(keyed, "output records"), every_shard)
        | "all shards" >> beam.Flatten()
        | "by shard" >> beam.GroupByKey()
        | "write shards" >> beam.ParDo(beam_io.WriteShard(output_dir, config.output.prefix), shard_side)
    )


def _runner(options: PipelineOptions) -> Any:
    """The runner named in the options; DirectRunner means the portable in-process runner
    (FnApiRunner: --direct_num_workers, --direct_running_mode), without Beam's default first try
    of Prism, which downloads its binary at run time (--runner=PrismRunner --prism_location=...
    runs Prism from a local binary)."""
    name = options.view_as(StandardOptions).runner
    if name in (None, "DirectRunner"):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner  # noqa: PLC0415

        return FnApiRunner()
    return None  # Beam resolves the name


def run(
    input_paths: Sequence[str],
    output_dir: str,
    config: ml_collections.ConfigDict,
    tokenizer: Any | None = None,
    pipeline_args: Sequence[str] = (),
    measure_shuffle: bool = False,
) -> dict[str, Any]:
    """Runs the curation on the Beam runner named in `pipeline_args` (`--runner=...` and the
    runner's own options); returns the report, also written to `output_dir`/report.json."""
    config_lib.validate_prepare_config(config)
    if not input_paths:
        raise ValueError("no inputs given")
    if beam_io.existing_shards(output_dir, config.output.prefix):
        raise FileExistsError(f"{output_dir} already holds shards named {config.output.prefix}-*.array_record; remove them or pick another output directory")
    if "://" not in output_dir:
        os.makedirs(output_dir, exist_ok=True)
    started = time.perf_counter()
    items = beam_io.expand(input_paths)
    index = preparation.build_contamination_index(config) if config.decontam.enabled else None
    options = PipelineOptions(list(pipeline_args))
    pipeline = beam.Pipeline(runner=_runner(options), options=options)
    build(pipeline, items, config, index, tokenizer, output_dir, measure_shuffle)
    result = pipeline.run()
    result.wait_until_finish()
    counts = beam_io.counts_of(result)
    seconds = time.perf_counter() - started
    names = sorted(os.path.basename(path) for path in beam_io.existing_shards(output_dir, config.output.prefix))
    report = preparation.make_report(counts, config, input_paths, output_dir, names)
    report.update(
        runner=options.view_as(StandardOptions).runner or "DirectRunner",
        seconds=round(seconds, 3),
        input_megabytes_per_second=round(counts.get("stage/read/bytes_in", 0) / 1e6 / seconds, 3),
    )
    if measure_shuffle:
        report["shuffle_bytes"] = {name.partition("/")[2]: value for name, value in sorted(counts.items()) if name.startswith("shuffle/")}
    report["config"] = config.to_dict()
    beam_io.write_json(beam_io.FileSystems.join(output_dir, "report.json"), report)
    return report
