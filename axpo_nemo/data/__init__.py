"""Datasets: the sample schema, JSONL files with images beside them, and the synthetic tool task."""

from axpo_nemo.agent.sample import (  # the schema, re-exported
    ANSWER_TYPES,
    Sample,
    read_samples,
    write_samples,
)

__all__ = ["ANSWER_TYPES", "Sample", "read_samples", "write_samples"]
