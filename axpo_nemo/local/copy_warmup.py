"""Copy warm-up: the induction heads a pretrained checkpoint already has, for a tiny model built
from scratch.

SFT asks a policy to copy: operands from the question into a tool call, a number from a tool's
output into the answer. A real Qwen3-VL checkpoint does that from pretraining. A freshly built
2-layer model does not, and SFT alone teaches it slowly: the copied tokens are a few per
trajectory, so the copy circuit (a previous-token head feeding an induction head) forms only
after hundreds of steps, and in a 1,100-token prompt full of tool schemas it did not form at all
within the demo's budget (measured: operands stayed at chance, p ~ 0.1, after 300 SFT steps).

A few hundred steps of language modelling on random-token sequences that repeat a span
(``x, filler, x``; the loss is on the repeat) grow those heads in seconds on a CPU. This
module makes those batches; `SFTTrainer` runs them before its SFT steps when
``sft.copy_warmup_steps`` > 0, and beside every later step when ``sft.copy_rehearsal_batch`` > 0
(SFT alone overwrites the circuit: docs/results.md). Off by default: a pretrained checkpoint
needs none.
"""

from __future__ import annotations

import torch

__all__ = ["copy_batch", "copy_loss"]


def copy_batch(
    vocab_limit: int,
    batch_size: int,
    span: int,
    gap: int,
    seed: int,
    step: int,
    alphabet: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[batch_size, 2·span + gap]`` token ids: a random span, random filler, the span again.

    Ids are drawn uniformly from ``[0, vocab_limit)`` (the ordinary tokens: keep the special ones
    out). With ``alphabet`` (token ids, e.g. the digits and a space), the odd rows draw their span
    from it instead: in a span of digits the same pair of tokens recurs, so copying it needs the
    position, not just the previous token (how a number's digits are copied). The batch is a
    pure function of ``(seed, step)``, so a resumed run draws the same.
    """
    g = torch.Generator().manual_seed((int(seed) & 0xFFFFFFFF) * 1_000_003 + int(step))
    x = torch.randint(0, vocab_limit, (batch_size, span), generator=g)
    filler = torch.randint(0, vocab_limit, (batch_size, gap), generator=g)
    if alphabet is not None and len(alphabet):
        pick = torch.randint(0, len(alphabet), (batch_size, span), generator=g)
        x[1::2] = alphabet[pick[1::2]]
    return torch.cat([x, filler, x], dim=1)


def copy_loss(model, tokens: torch.Tensor, span: int) -> torch.Tensor:
    """Mean next-token NLL of the repeated span's tokens after its first (the predictable ones)."""
    tokens = tokens.to(next(model.parameters()).device)
    logits = model(input_ids=tokens).logits[:, -span:-1].float()
    targets = tokens[:, -span + 1 :]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
