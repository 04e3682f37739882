"""The curation report as flat named counts, shared by the local driver and the Beam pipeline.

Every fact of `report.json` is a sum of increments under one name, so the local driver keeps a
`collections.Counter` and the Beam pipeline increments Beam metrics counters of the same names;
`summary` turns either into the same report. Names:

  stage/<stage>/{documents_in,documents_out,bytes_in,bytes_out}   per stage of `STAGES`
  drop/<stage>/<reason>                                           dropped documents per reason
  pii/<kind>   contamination/<problem>   language/<lang>          redactions, matches, output languages
  duplicates/{exact,near,near_clusters}   output/{records,bytes}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

STAGES = ("read", "language", "quality", "decontamination", "exact_dedup", "near_dedup", "pii", "repository")
_STAGE_FIELDS = ("documents_in", "documents_out", "bytes_in", "bytes_out")

Count = Callable[[str, int], None]  # adds an increment to a named count


def passed(count: Count, stage: str, bytes_in: int, bytes_out: int | None = None, documents_in: int = 1, documents_out: int = 1) -> None:
    count(f"stage/{stage}/documents_in", documents_in)
    count(f"stage/{stage}/documents_out", documents_out)
    count(f"stage/{stage}/bytes_in", bytes_in)
    count(f"stage/{stage}/bytes_out", bytes_in if bytes_out is None else bytes_out)


def dropped(count: Count, stage: str, size: int, reason: str) -> None:
    passed(count, stage, size, 0, documents_out=0)
    count(f"drop/{stage}/{reason}", 1)


def summary(counts: Mapping[str, int], pii_kinds: Sequence[str] | None, decontam_action: str, bands: int, rows: int) -> dict[str, Any]:
    """The report's count sections from named counts.

    Args:
      counts: name -> value (missing names are 0).
      pii_kinds: the redacted kinds (each reported, 0 included), or None when PII is disabled.
      decontam_action: 'drop', 'flag' or 'disabled'.
      bands, rows: the LSH shape used.
    """
    stages = {stage: {field: int(counts.get(f"stage/{stage}/{field}", 0)) for field in _STAGE_FIELDS} for stage in STAGES}
    drop_reasons: dict[str, dict[str, int]] = {}
    by_prefix: dict[str, dict[str, int]] = {"pii": {}, "contamination": {}, "language": {}}
    for name, value in sorted(counts.items()):
        kind, _, rest = name.partition("/")
        if kind == "drop" and value:
            stage, _, reason = rest.partition("/")
            drop_reasons.setdefault(stage, {})[reason] = int(value)
        elif kind in by_prefix and value:
            by_prefix[kind][rest] = int(value)
    contamination = by_prefix["contamination"]
    languages = sorted(by_prefix["language"].items(), key=lambda item: (-item[1], item[0]))
    return {
        "stages": stages,
        "drop_reasons": {stage: drop_reasons[stage] for stage in STAGES if stage in drop_reasons},
        "duplicates": {
            "exact": int(counts.get("duplicates/exact", 0)),
            "near": int(counts.get("duplicates/near", 0)),
            "near_clusters": int(counts.get("duplicates/near_clusters", 0)),
            "lsh_bands": bands,
            "lsh_rows": rows,
        },
        "pii_redactions": {} if pii_kinds is None else {kind: by_prefix["pii"].get(kind, 0) for kind in pii_kinds},
        "contamination": {"action": decontam_action, "documents": sum(contamination.values()), "by_problem": contamination},
        "output": {"records": int(counts.get("output/records", 0)), "bytes": int(counts.get("output/bytes", 0)), "languages": dict(languages)},
    }
