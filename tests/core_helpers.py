"""Hand-made rollouts for the framework-free AXPO core tests (tests/test_core_*.py).

Standard tool-using rollout (13 tokens, prompt_len 3)::

    pos   0 1 2   3 4       5            6 7         8              9 10          11 12
          prompt  thinking  <tool_call>  call body   </tool_call>   observation   answer
    gen   F F F   T T       T            T T         T              F F           T T

    call_start = 5, call_end = 9, candidate prefix = tokens [0, 6) (PREFIX_LEN).

Standard no-tool rollout (10 tokens): prompt 0..2 (not generated), answer 3..9 (generated).

A continuation of a prefix copies the source's first PREFIX_LEN tokens (with their generated flags,
so only ``prefix_len`` can keep them out of the loss) and appends 7 new tokens laid out like
positions 6..12 above, so it is 13 tokens long too.
"""

from __future__ import annotations

import math

import torch

from axpo_nemo import core

EPS = 1e-6
OPEN, CLOSE = 1001, 1002
PROMPT_LEN = 3
CALL_START, CALL_END = 5, 9
PREFIX_LEN = CALL_START + 1
TOOL_LEN, NO_TOOL_LEN = 13, 10
# Log-probability of every generated token outside the first call's body (thinking, the opening
# marker, the answer): far from any call probability used in the tests, so counting such a token
# in the uncertainty would visibly change it.
OTHER_LP = math.log(0.01)

TOOL_GEN = [False] * 3 + [True] * 6 + [False] * 2 + [True] * 2
NO_TOOL_GEN = [False] * 3 + [True] * 7


def tool_rollout(
    group: int,
    reward: float,
    *,
    correct: bool | None = None,
    u: float | None = None,
    call_probs: tuple[float, float, float] | None = None,
    well_formed: bool = True,
    num_turns: int = 2,
    source: int | None = None,
    prefix_len: int = 0,
) -> core.Rollout:
    """A standard 13-token tool-using rollout; its first call's body/closing-marker tokens
    (positions 6, 7, 8) have probabilities ``call_probs`` (or ``(u, u, u)``)."""
    if call_probs is None:
        call_probs = (u if u is not None else 0.5,) * 3
    lps = [0.0] * 3 + [OTHER_LP] * 3 + [math.log(p) for p in call_probs] + [0.0] * 2 + [OTHER_LP] * 2
    toks = [11, 12, 13, 21, 22, OPEN, 31, 32, CLOSE, 41, 42, 51, 52]
    return core.Rollout(
        group=group,
        token_ids=toks,
        prompt_len=PROMPT_LEN,
        generated=TOOL_GEN,
        logprobs=lps,
        reward=reward,
        correct=(reward >= 1.0) if correct is None else correct,
        tool_calls=[core.ToolCallSpan(CALL_START, CALL_END, 0, well_formed, "zoom" if well_formed else None)],
        num_turns=num_turns,
        source=source,
        prefix_len=prefix_len,
    )


def no_tool_rollout(
    group: int, reward: float, *, correct: bool | None = None, num_turns: int = 1
) -> core.Rollout:
    """A standard 10-token rollout without tool calls."""
    return core.Rollout(
        group=group,
        token_ids=[11, 12, 13, 61, 62, 63, 64, 65, 66, 67],
        prompt_len=PROMPT_LEN,
        generated=NO_TOOL_GEN,
        logprobs=[0.0] * 3 + [OTHER_LP] * 7,
        reward=reward,
        correct=(reward >= 1.0) if correct is None else correct,
        num_turns=num_turns,
    )


def continuation(
    src: core.Rollout, src_row: int, reward: float, *, correct: bool | None = None
) -> core.Rollout:
    """One of the K continuations of ``src``'s frozen prefix (tokens [0, PREFIX_LEN))."""
    toks = [*src.token_ids[:PREFIX_LEN].tolist(), 71, 72, CLOSE, 41, 42, 81, 82]
    gen = [*src.generated[:PREFIX_LEN].tolist(), True, True, True, False, False, True, True]
    lps = [*src.logprobs[:PREFIX_LEN].tolist(), -0.1, -0.2, -0.3, 0.0, 0.0, -0.4, -0.5]
    return core.Rollout(
        group=src.group,
        token_ids=toks,
        prompt_len=src.prompt_len,
        generated=gen,
        logprobs=lps,
        reward=reward,
        correct=(reward >= 1.0) if correct is None else correct,
        tool_calls=[core.ToolCallSpan(CALL_START, CALL_END)],
        num_turns=2,
        source=src_row,
        prefix_len=PREFIX_LEN,
    )


def fresh_rollout(src: core.Rollout, src_row: int, reward: float) -> core.Rollout:
    """An extra full rollout of ``src``'s question (prefix_fixing=False): prefix = the prompt."""
    return tool_rollout(src.group, reward, source=src_row, prefix_len=src.prompt_len)


def batch(rollouts) -> core.RolloutBatch:
    return core.RolloutBatch.from_rollouts(list(rollouts))


def tool_row(prefix: float, tail: float) -> list[float]:
    """Expected advantages of a standard tool rollout: ``prefix`` on its generated tokens up to and
    including the marker (3, 4, 5), ``tail`` on the rest it generated (6, 7, 8, 11, 12)."""
    p, a = prefix, tail
    return [0, 0, 0, p, p, p, a, a, a, 0, 0, a, a]


def no_tool_row(a: float) -> list[float]:
    """Expected advantages of a standard no-tool rollout (padded to 13 tokens)."""
    return [0, 0, 0, a, a, a, a, a, a, a, 0, 0, 0]


def cont_row(a: float) -> list[float]:
    """Expected advantages of a prefix continuation: nothing on the frozen prefix [0, 6)."""
    return [0, 0, 0, 0, 0, 0, a, a, a, 0, 0, a, a]


TOOL_MASK = [bool(x) for x in tool_row(1, 1)]
NO_TOOL_MASK = [bool(x) for x in no_tool_row(1)]
CONT_MASK = [bool(x) for x in cont_row(1)]


def t32(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ----- the shared two-group scenario of the hand-computed rule tests -----

# Group statistics used throughout (Bessel std, eps added):
# rewards [0,0,1,0] or [1,0,0,0]: mean .25, sum sq dev .75, var .75/3 = .25, std .5
HI = 0.75 / (0.5 + EPS)  # reward 1 in such a group
LO = -0.25 / (0.5 + EPS)  # reward 0 in such a group
# rewards [1,0] (K=2): mean .5, var (.25+.25)/1 = .5, std sqrt(.5)
S2 = 0.5 / (0.7071067811865476 + EPS)
# rewards [1,0,1,0]: mean .5, var 1/3, std sqrt(1/3)
P4 = 0.5 / (0.5773502691896257 + EPS)
# joint [0,0,1,0, 1,0, 0,0]: mean .25, sum sq dev 2*.5625 + 6*.0625 = 1.5, var 1.5/7
J1 = 0.75 / (0.4629100498862757 + EPS)
J0 = -0.25 / (0.4629100498862757 + EPS)
# joint with sources replaced [1,0,1,0, 1,0, 0,0]: mean .375, sum sq 3*.390625 + 5*.140625 = 1.875
C1 = 0.625 / (0.5175491695067657 + EPS)
C0 = -0.375 / (0.5175491695067657 + EPS)


def assert_close(actual, expected, atol=1e-6, rtol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# The shared two-group scenario (B=2, N=4, K=2, r=0.5 -> M = floor(.5*8/2) = 2)
#   g0 (triggered: tool subgroup {0, 1} all wrong, although no-tool row 2 is right)
#     row 0  tool  wrong r=0  u=.2
#     row 1  tool  wrong r=0  u=.4
#     row 2  no tool correct r=1
#     row 3  no tool wrong r=0
#   g1 (not triggered: row 4 is a correct tool rollout); rows 5-7 have very low u on purpose
#     row 4  tool correct r=1 u=.9;  rows 5, 6, 7 tool wrong r=0, u=.3, .1, .05
#   continuations: rows 8, 9 from row 0 (rewards 1, 0); rows 10, 11 from row 1 (rewards 0, 0)
def originals():
    return [
        tool_rollout(0, 0.0, u=0.2),
        tool_rollout(0, 0.0, u=0.4),
        no_tool_rollout(0, 1.0),
        no_tool_rollout(0, 0.0),
        tool_rollout(1, 1.0, u=0.9),
        tool_rollout(1, 0.0, u=0.3),
        tool_rollout(1, 0.0, u=0.1),
        tool_rollout(1, 0.0, u=0.05),
    ]


def scenario(**cfg):
    orig = originals()
    axpo = core.AXPOConfig(r=0.5, k=2, **cfg)
    plan = core.plan_resampling(batch(orig), axpo, seed=0)
    assert plan.selected.tolist() == [0, 1]
    if axpo.prefix_fixing:
        extra = [continuation(orig[0], 0, 1.0), continuation(orig[0], 0, 0.0)]
        extra += [continuation(orig[1], 1, 0.0), continuation(orig[1], 1, 0.0)]
    else:
        extra = [fresh_rollout(orig[0], 0, 1.0), fresh_rollout(orig[0], 0, 0.0)]
        extra += [fresh_rollout(orig[1], 1, 0.0), fresh_rollout(orig[1], 1, 0.0)]
    return batch(orig + extra), plan, axpo


G1_ROWS = [tool_row(HI, HI), tool_row(LO, LO), tool_row(LO, LO), tool_row(LO, LO)]
SCENARIO_MASK = [TOOL_MASK, TOOL_MASK, NO_TOOL_MASK, NO_TOOL_MASK] + [TOOL_MASK] * 4 + [CONT_MASK] * 4
