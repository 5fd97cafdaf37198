"""The benchmark suite (``axpo eval --suite``): AXPO's reasoning, perception and search benchmarks.

`registry` lists the benchmarks (loader for the public file format, group, scoring rule);
`tables` reads TSV / Parquet / JSON(L) files and their images; `prompts` words the questions;
`benchmark_scores` turns per-question Pass@k into benchmark, group and average scores; `runner` evaluates
through the agent loop with resumable per-benchmark results; `report` writes the tables.
"""

from axpo_nemo.eval.suite.benchmark_scores import BenchmarkScore, SuiteResult
from axpo_nemo.eval.suite.registry import BENCHMARKS, GROUPS, Benchmark, resolve_suite
from axpo_nemo.eval.suite.report import paper_table, write_suite_reports
from axpo_nemo.eval.suite.runner import collect_results, run_suite
from axpo_nemo.eval.suite.tables import BenchmarkFormatError, ImageStore

__all__ = [
    "BENCHMARKS",
    "GROUPS",
    "Benchmark",
    "BenchmarkFormatError",
    "BenchmarkScore",
    "ImageStore",
    "SuiteResult",
    "collect_results",
    "paper_table",
    "resolve_suite",
    "run_suite",
    "write_suite_reports",
]
