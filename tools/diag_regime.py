"""Where a policy's tool rollouts fail, and the RL regime that implies, from one evaluation.

Reads an evaluation's ``results.jsonl`` (``axpo eval --out DIR``, best with many samples per
question, e.g. ``eval.samples_per_question=16``) and the questions it ran (their metadata hold
the synthetic task's ``reference_call`` and ``value``). Prints, per question family:

* tool use, accuracy with and without tools;
* for families with a reference call: the share of first calls equal to it (same tool, same
  arguments) and, after such a call, the share of answers equal to the value it shows (the
  policy copied the tool's output).

Then the regime AXPO's first RL steps would see, estimated per question from its samples (tool
rate t, accuracy of its tool rollouts p): a group of ``--group-size`` rollouts used a tool and
got every tool rollout wrong with probability (1 - t·p)^N - (1 - t)^N (the all-wrong tool-subgroup
rate is its sum over questions divided by that of 1 - (1 - t)^N), and a selected prefix of that
question is recovered by one of ``--k`` continuations with probability 1 - (1 - p)^K. The latter
holds where the frozen prefix says nothing about the call (the synthetic task's, whose thinking
before a call is the decision only): each continuation is then a fresh tool rollout. Recovery is
the trigger-weighted mean. The last line:
``regime: all-wrong tool-subgroup rate A, recovery R, tool accuracy T vs no-tool accuracy G``
(the last two over the questions of tool families).

Usage: ``python tools/diag_regime.py EVAL_DIR QUESTIONS_JSONL [--group-size 8] [--k 4]``.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from axpo_nemo.agent.sample import read_samples
from axpo_nemo.data.results_file import read_results_file


def _first_call(sample: dict) -> dict | None:
    calls = sample.get("tool_calls") or []
    return calls[0] if calls else None


def family_rows(results: list[dict], metadata: dict[str, dict]) -> list[dict]:
    """Per family: rollouts, tool use, accuracies, reference-call and copied-answer shares.

    ``metadata``: each question's metadata by id (its ``reference_call`` and ``value``)."""
    acc: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for q in results:
        meta = metadata.get(q["id"], {})
        ref, value = meta.get("reference_call"), meta.get("value")
        f = acc[q["category"]]
        for s in q["samples"]:
            f["n"] += 1
            f["tool"] += bool(s["tool_using"])
            f["right_tool" if s["tool_using"] else "right_no_tool"] += bool(s["correct"])
            call = _first_call(s)
            if ref is None or call is None:
                continue
            f["calls"] += 1
            if call.get("name") == ref["name"] and call.get("arguments") == ref["arguments"]:
                f["ref_calls"] += 1
                f["copied"] += str(s.get("answer")) == str(value)
    rows = []
    for name in sorted(acc):
        f = acc[name]
        rows.append(
            {
                "family": name,
                "rollouts": int(f["n"]),
                "tool_use": f["tool"] / f["n"],
                "acc_tool": f["right_tool"] / f["tool"] if f["tool"] else None,
                "acc_no_tool": f["right_no_tool"] / (f["n"] - f["tool"]) if f["n"] > f["tool"] else None,
                "reference_calls": f["ref_calls"] / f["calls"] if f["calls"] else None,
                "copied_after_reference": f["copied"] / f["ref_calls"] if f["ref_calls"] else None,
            }
        )
    return rows


def regime(results: list[dict], tool_families: set[str], group_size: int, k: int) -> dict[str, float]:
    """The estimated all-wrong tool-subgroup rate and recovery, and tool vs no-tool accuracy."""
    triggered = any_tool = recovered = 0.0
    tool_n = tool_right = plain_n = plain_right = 0
    for q in results:
        n, t_n, right_t = q["n"], q["tool_using"], q["correct_tool"]
        if q["category"] in tool_families:
            tool_n, tool_right = tool_n + t_n, tool_right + right_t
            plain_n, plain_right = plain_n + n - t_n, plain_right + q["correct"] - right_t
        if not t_n:
            continue
        t, p = t_n / n, right_t / t_n
        trig = (1 - t * p) ** group_size - (1 - t) ** group_size
        triggered += trig
        any_tool += 1 - (1 - t) ** group_size
        recovered += trig * (1 - (1 - p) ** k)
    nan = float("nan")
    return {
        "all_wrong": triggered / any_tool if any_tool else nan,
        "recovery": recovered / triggered if triggered else nan,
        "tool_accuracy": tool_right / tool_n if tool_n else nan,
        "no_tool_accuracy": plain_right / plain_n if plain_n else nan,
    }


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def main(argv: list[str] | None = None) -> None:
    """Print the per-family table and the regime line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_dir", type=Path, help="an `axpo eval --out` folder (its results.jsonl)")
    parser.add_argument("questions", type=Path, help="the question JSONL it evaluated")
    parser.add_argument("--group-size", type=int, default=8, help="N, rollouts per group")
    parser.add_argument("--k", type=int, default=4, help="K, continuations per selected prefix")
    args = parser.parse_args(argv)
    _, results = read_results_file(args.eval_dir / "results.jsonl")
    samples = list(read_samples(args.questions))
    rows = family_rows(results, {q.id: q.metadata for q in samples})
    print("| family | rollouts | tool use | acc. with tools | acc. without | reference calls | copied after one |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['family']} | {r['rollouts']} | {_pct(r['tool_use'])} | {_pct(r['acc_tool'])} | "
            f"{_pct(r['acc_no_tool'])} | {_pct(r['reference_calls'])} | {_pct(r['copied_after_reference'])} |"
        )
    tool_families = {q.category for q in samples if q.metadata.get("reference_call") is not None}
    est = regime(results, tool_families, args.group_size, args.k)
    print(
        f"regime: all-wrong tool-subgroup rate {est['all_wrong']:.2f}, recovery {est['recovery']:.2f}, "
        f"tool accuracy {est['tool_accuracy']:.2f} vs no-tool accuracy {est['no_tool_accuracy']:.2f}"
    )


if __name__ == "__main__":
    main()
