"""The benchmark registry: each benchmark's name, group, loader, tools and scoring rule.

Groups follow DESIGN.md's evaluation suite: reasoning (MATH-Vision, DynaMath, MathVerse, WeMath),
perception (HRBench-4K, HRBench-8K, VisualProbe, V* Bench) and search (HR-MMSearch, FVQA-test,
MMSearch). `resolve_suite` turns ``all``, a group name, or a comma list of keys and groups into
benchmarks, in registry order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from axpo_nemo.agent.sample import Sample
from axpo_nemo.eval.suite import perception, reasoning, search
from axpo_nemo.eval.suite.tables import ImageStore

GROUPS = ("reasoning", "perception", "search")
#: The tools each group's questions may use.
GROUP_TOOLS = {
    "reasoning": tuple(reasoning.REASONING_TOOLS),
    "perception": tuple(perception.PERCEPTION_TOOLS),
    "search": tuple(search.SEARCH_TOOLS),
}
#: How a benchmark turns per-question Pass@k into its score (see `scoring`).
AGGREGATES = ("mean", "cycles", "variants")


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of the suite.

    Attributes:
        key: the name on the command line and the folder under ``--data-dir``.
        title: the name in tables (as the paper writes it).
        group: ``reasoning``, ``perception`` or ``search``.
        loader: ``loader(folder, image_store) -> [Sample]`` for the public file format.
        aggregate: ``mean`` (Pass@k averaged over questions), ``cycles`` (HRBench: averaged within
            each option rotation, then over rotations; also the all-rotations score) or
            ``variants`` (DynaMath: average case, plus the worst case over a seed's variants).
        formats: the accepted files, for documentation and error messages.
        reward_overrides: `RewardConfig` fields this benchmark's official scoring changes.
    """

    key: str
    title: str
    group: str
    loader: Callable[[Path, ImageStore], list[Sample]]
    aggregate: str = "mean"
    formats: str = ""
    reward_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def tools(self) -> tuple[str, ...]:
        """The tools this benchmark's questions may use (its group's)."""
        return GROUP_TOOLS[self.group]

    def load(self, folder: Path, store: ImageStore) -> list[Sample]:
        """The benchmark's questions from ``folder`` (its files in their public format)."""
        if not folder.is_dir():
            raise FileNotFoundError(
                f"benchmark '{self.key}': folder {folder} does not exist (expected {self.formats})"
            )
        samples = self.loader(folder, store)
        if not samples:
            raise ValueError(
                f"benchmark '{self.key}': no questions found in {folder} (expected {self.formats})"
            )
        return samples


_ALL = [
    Benchmark("mathvision", "MATH-Vision", "reasoning", reasoning.load_mathvision,
              formats="HF parquet/JSONL (MathLLMs/MathVision) or MathVision.tsv"),
    Benchmark("dynamath", "DynaMath", "reasoning", reasoning.load_dynamath, aggregate="variants",
              formats="sample_variant*.parquet/.jsonl (DynaMath/DynaMath_Sample) or DynaMath.tsv",
              # official check: |prediction - answer| <= 0.001 for float answers
              reward_overrides={"math_rel_tol": 1e-3}),
    Benchmark("mathverse", "MathVerse", "reasoning", reasoning.load_mathverse,
              formats="testmini parquet/JSON (AI4Math/MathVerse) or MathVerse_MINI*.tsv"),
    Benchmark("wemath", "WeMath", "reasoning", reasoning.load_wemath,
              formats="testmini.json (We-Math) or WeMath.tsv"),
    Benchmark("hrbench_4k", "HRBench-4K", "perception", perception.load_hrbench, aggregate="cycles",
              formats="hr_bench_4k.tsv or .parquet (DreamMr/HR-Bench)"),
    Benchmark("hrbench_8k", "HRBench-8K", "perception", perception.load_hrbench, aggregate="cycles",
              formats="hr_bench_8k.tsv or .parquet (DreamMr/HR-Bench)"),
    Benchmark("visualprobe", "VisualProbe", "perception", perception.load_visualprobe,
              formats="VisualProbe_{Easy,Medium,Hard}/val.json (Mini-o3) with their images"),
    Benchmark("vstar", "V* Bench", "perception", perception.load_vstar,
              formats="test_questions.jsonl with images (craigwu/vstar_bench) or VStarBench.tsv"),
    Benchmark("hr_mmsearch", "HR-MMSearch", "search", search.load_hr_mmsearch,
              formats="parquet/JSONL with query, ground_truth, image (sensenova/HR-MMSearch)"),
    Benchmark("fvqa", "FVQA-test", "search", search.load_fvqa,
              formats="fvqa_test.parquet (lmms-lab/FVQA) or the same rows as JSONL"),
    Benchmark("mmsearch", "MMSearch", "search", search.load_mmsearch,
              formats="end2end parquet/JSONL (CaraJ/MMSearch)"),
]  # fmt: skip

#: Benchmarks by key, in table order (grouped).
BENCHMARKS: dict[str, Benchmark] = {b.key: b for b in _ALL}


def resolve_suite(spec: str) -> list[Benchmark]:
    """The benchmarks a ``--suite`` value names: ``all``, a group, or a comma list of both and keys.

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    wanted: set[str] = set()
    for name in (part.strip().lower() for part in str(spec).split(",")):
        if not name:
            continue
        if name == "all":
            wanted.update(BENCHMARKS)
        elif name in GROUPS:
            wanted.update(k for k, b in BENCHMARKS.items() if b.group == name)
        elif name in BENCHMARKS:
            wanted.add(name)
        else:
            raise ValueError(
                f"--suite: unknown benchmark or group {name!r}; choose from all, {', '.join(GROUPS)}, "
                f"{', '.join(BENCHMARKS)}"
            )
    if not wanted:
        raise ValueError("--suite: name at least one benchmark or group")
    return [b for k, b in BENCHMARKS.items() if k in wanted]
