"""Datasets: the sample schema, JSONL files with images beside them, and the synthetic tool task."""

from axpo_nemo.data.schema import ANSWER_TYPES, Sample, read_samples, write_samples

__all__ = ["ANSWER_TYPES", "Sample", "read_samples", "write_samples"]
