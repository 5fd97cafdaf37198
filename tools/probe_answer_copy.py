"""Does an SFT model read its answer from the tool's output? Teacher-forced, per question family.

For every tool trajectory of an SFT data file (replayed through the real tools, as SFT and RL
tokenize them), the probe scores the first token of the boxed answer that follows a tool
observation: the token the policy has to copy from the tool's output. It prints, per family, the
mean NLL of that token and the share of trajectories where its probability is above one half.
A model that copies has NLL near 0; one that guesses among the options has NLL near log k.

A mean SFT loss hides this: the token is one of ~60 loss tokens of a trajectory. Run it on the
training data and on a synthetic set of another ``data.synth.seed``: a model that copies scores
both alike (a multiplication's product could also be memorised from its operands; an area's
count, read from pixels, hardly).

Usage: ``python tools/probe_answer_copy.py RUN_DIR [--weights W.pt] [--data DATA_DIR] [--limit 160]``
(``RUN_DIR`` holds ``config.yaml``; the weights default to its ``sft/final.pt``, the data to
its ``data/``).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from axpo_nemo.agent.loop import AgentLoopConfig
from axpo_nemo.agent.protocol import ChatProtocol
from axpo_nemo.agent.sample import read_samples
from axpo_nemo.agent.sft_examples import SFTExample, tokenize_samples
from axpo_nemo.config.loader import load_config
from axpo_nemo.local.policy import iter_logprobs
from axpo_nemo.models import build_policy
from axpo_nemo.run.toolset import build_command_tools

BOX = "boxed{"


def answer_position(example: SFTExample, box_ids: Sequence[int]) -> int | None:
    """Index of the first answer token after the last ``boxed{`` that follows a tool observation."""
    ids, after = example.token_ids, example.after_observation
    n = len(box_ids)
    starts = [k for k in range(len(ids) - n) if ids[k : k + n] == list(box_ids) and bool(after[k])]
    return starts[-1] + n if starts else None


def probe(
    model, examples: Sequence[SFTExample], families: Sequence[str], box_ids: Sequence[int], pad_id: int
) -> dict:
    """Per family: ``n``, mean NLL of the answer's first token and the share with p > 1/2.

    Examples without a boxed answer after an observation (no tool call) are left out."""
    stats: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])
    positions = [answer_position(e, box_ids) for e in examples]
    keep = [i for i, p in enumerate(positions) if p is not None]
    needed = []
    for i in keep:
        mask = torch.zeros(len(examples[i]), dtype=torch.bool)
        mask[positions[i]] = True
        needed.append(mask)
    with torch.no_grad():
        for chunk in iter_logprobs(
            model, [examples[i] for i in keep], micro_batch_size=8, needed=needed, pad_id=pad_id
        ):
            for j, r in enumerate(chunk.rows):
                lp = float(chunk.logprobs[j, positions[keep[r]]])  # logprobs[t]: of token t given < t
                s = stats[families[keep[r]]]
                s[0] += 1
                s[1] -= lp
                s[2] += lp > -0.6931
    return {
        f: {"n": int(n), "nll": nll / n, "p_above_half": ok / n} for f, (n, nll, ok) in sorted(stats.items())
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--limit", type=int, default=160, help="tool trajectories scored at most")
    args = parser.parse_args()
    data = args.data or args.run / "data"
    cfg = load_config(args.run / "config.yaml", [f"tools.search.corpus_path={data / 'corpus.jsonl'}"])
    bundle = build_policy(cfg.model, seed=cfg.seed)
    weights = args.weights or args.run / "sft" / "final.pt"
    bundle.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    bundle.model.eval()
    protocol = ChatProtocol(bundle.processor)
    loop = AgentLoopConfig.from_rollout_config(cfg.rollout, tool_timeout_s=cfg.tools.timeout_s, seed=cfg.seed)
    samples = [s for s in read_samples(data / cfg.data.sft_file) if len(s.messages) > 1][: args.limit]
    with build_command_tools(cfg) as tools:
        examples, _, _ = tokenize_samples(samples, data, tools, protocol, loop, cfg.sft.max_tokens)
    family = {s.id: s.category for s in samples}
    box_ids = bundle.tokenizer.encode(BOX, add_special_tokens=False)
    pad_id = bundle.tokenizer.pad_token_id or 0
    result = probe(bundle.model, examples, [family[e.sample_id] for e in examples], box_ids, pad_id)
    print("| family | tool trajectories | answer-token NLL | p > 1/2 |")
    print("|---|---:|---:|---:|")
    for f, r in result.items():
        print(f"| {f} | {r['n']} | {r['nll']:.3f} | {r['p_above_half']:.2f} |")


if __name__ == "__main__":
    main()
