"""Writes code records as a TFDS dataset directory readable without TensorFlow.

Layout (TFDS "array_record" file format), under `data_dir`:

    <name>/<version>/dataset_info.json, features.json
    <name>/<version>/<name>-<split>.array_record-00000-of-0000N

Records are `tf.train.Example` protos serialized by TFDS's own (TF-free)
feature serializer, so `tfds.data_source(name, split=..., data_dir=data_dir)`
and `tfds.builder_from_directory(...)` read them back, TensorFlow not needed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from array_record.python import array_record_module

from data.sources import ARRAY_RECORD_WRITER_OPTIONS, METADATA_FIELDS, Record

TFDS_VERSION = "1.0.0"


def write_tfds_dataset(
    data_dir: str | os.PathLike[str],
    name: str,
    shards_by_split: Mapping[str, Sequence[Sequence[Record]]],
    description: str = "",
) -> Path:
    """Writes one ArrayRecord file per shard and the TFDS metadata.

    Args:
      data_dir: TFDS data directory (the dataset goes to `<data_dir>/<name>/<version>`).
      name: dataset name.
      shards_by_split: split name -> shards -> records ({"text", path, repo, lang});
        missing metadata fields are written as "".
      description: stored in dataset_info.json.

    Returns:
      The dataset's version directory.
    """
    import tensorflow_datasets as tfds  # noqa: PLC0415  (slow import, only needed here)

    features = tfds.features.FeaturesDict({field: tfds.features.Text() for field in ("text", *METADATA_FIELDS)})
    version_dir = Path(data_dir) / name / TFDS_VERSION
    version_dir.mkdir(parents=True, exist_ok=True)
    split_infos = []
    for split, shards in shards_by_split.items():
        for shard_index, shard in enumerate(shards):
            path = version_dir / f"{name}-{split}.array_record-{shard_index:05d}-of-{len(shards):05d}"
            writer = array_record_module.ArrayRecordWriter(os.fspath(path), ARRAY_RECORD_WRITER_OPTIONS)
            try:
                for record in shard:
                    example = {field: record.get(field, "") for field in ("text", *METADATA_FIELDS)}
                    writer.write(features.serialize_example(example))
            finally:
                writer.close()
        split_infos.append(
            tfds.core.SplitInfo(name=split, shard_lengths=[len(shard) for shard in shards], num_bytes=0)
        )
    # check_data would read back through tf.data; tests read back with tfds.data_source instead.
    tfds.folder_dataset.write_metadata(
        data_dir=version_dir,
        features=features,
        split_infos=split_infos,
        check_data=False,
        description=description,
    )
    return version_dir
