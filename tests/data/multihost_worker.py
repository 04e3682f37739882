"""One of several local JAX processes reading its shard (run by test_multihost.py).

Usage: python -m tests.data.multihost_worker COORDINATOR PROCESS_ID NUM_PROCESSES CONFIG_JSON OUT_JSON
"""

from __future__ import annotations

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, PartitionSpec  # noqa: E402

from data.pipeline import build_iterator, to_global_batch  # noqa: E402
from data.tokenizers import load_tokenizer  # noqa: E402


def main(coordinator: str, process_id: str, num_processes: str, config_json: str, out_json: str) -> None:
    jax.distributed.initialize(coordinator, num_processes=int(num_processes), process_id=int(process_id))
    settings = json.loads(config_json)
    tokenizer = load_tokenizer(settings["tokenizer"])
    batches = list(build_iterator(settings["data"], tokenizer))  # a nested mapping; process index/count from JAX

    mesh = Mesh(np.array(jax.devices()), ("data",))
    global_batch = to_global_batch(batches[0], mesh, PartitionSpec("data"))
    local_rows = batches[0]["inputs"].shape[0]
    shards = sorted(global_batch["inputs"].addressable_shards, key=lambda s: s.index[0].start)
    local_view = np.concatenate([np.asarray(s.data) for s in shards])
    documents = []
    for batch in batches:
        for row in range(batch["inputs"].shape[0]):
            seg = batch["segment_ids"][row]
            for segment_id in np.unique(seg[seg > 0]):
                documents.append(tokenizer.decode(batch["targets"][row][seg == segment_id][:-1]))
    result = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "global_shape": list(global_batch["inputs"].shape),
        "local_rows": local_rows,
        "local_view_matches": bool(np.array_equal(local_view, batches[0]["inputs"])),
        "first_global_row": shards[0].index[0].start,
        "documents": documents,
    }
    with open(out_json, "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
