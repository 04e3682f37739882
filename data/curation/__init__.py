"""Code curation at corpus scale: `data.code`'s stages as an Apache Beam pipeline.

Modules:
  components  connected components of a large graph (large-star / small-star rounds)
  beam_io     inputs through Beam filesystems, sharded ArrayRecord output, metrics -> counts
  pipeline    the curation pipeline and `run` (what `python -m data.prepare --runner=...` calls)

Needs apache-beam, which requirements.txt cannot hold (it requires protobuf<7): install
launch/dataflow_requirements.txt into its own environment (see launch/dataflow.sh).
"""
