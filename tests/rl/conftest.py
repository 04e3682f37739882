"""The training tests' corpus and tokenizer fixtures, for a tiny starting run."""

from tests.train.conftest import corpus_dir, tokenizer  # noqa: F401  (fixtures)
