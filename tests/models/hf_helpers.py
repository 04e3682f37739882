"""Checks shared by the Hugging Face family tests: logits against transformers', and config.json defaults."""

import json

import numpy as np
import transformers

from models.config import ModelConfig
from models.hf import get_family, read_hf_config
from models.hf.family import HFConfig

TOLERANCE = 1e-4  # max abs logits difference in float32


def logits_diff(actual, expected: np.ndarray) -> float:
    """Max abs difference of codelm's logits from transformers' (which must vary, or it proves nothing)."""
    assert expected.std() > 0.5, "reference logits are near-constant; the comparison would prove nothing"
    return float(np.abs(np.asarray(actual) - expected).max())


def assert_logits_close(actual, expected: np.ndarray) -> None:
    np.testing.assert_array_less(logits_diff(actual, expected), TOLERANCE)


def assert_minimal_config_reads_like_transformers(model_type: str, tmp_path, **shape) -> ModelConfig:
    """A config.json with only `model_type` and `shape` reads as transformers' fully expanded one does
    (the family's defaults fill only what transformers lacks); returns codelm's config of it."""
    minimal = {"model_type": model_type, **shape}
    (tmp_path / "config.json").write_text(json.dumps(minimal))
    expanded = transformers.AutoConfig.for_model(**minimal).to_dict()
    family = get_family(model_type)
    ours, _ = read_hf_config(tmp_path)
    for field, value in family.config_fields(HFConfig(expanded, "expanded", family.defaults)).items():
        assert getattr(ours, field) == value, field
    return ours
