"""Single-process backend: the HF transformers Qwen3-VL policy and its KV-cached sampler."""

from axpo_nemo.local.generator import GeneratorStats, LocalGenerator, mrope_positions, sample_tokens

__all__ = ["GeneratorStats", "LocalGenerator", "mrope_positions", "sample_tokens"]
