"""Next-token choice: penalties and bans per sequence, then greedy for the whole batch at once and
seeded sampling per sequence."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from backend.engine.request import SamplingParams


@dataclass(frozen=True)
class Controls:
    """What one sequence's next-token choice needs beside its logits."""

    params: SamplingParams
    generator: torch.Generator | None = None
    tokens: Sequence[int] = ()  # prompt + output: repetition_penalty
    output: Sequence[int] = ()  # output only: presence and frequency penalties
    banned: tuple[int, ...] = ()  # ids that may not be chosen now: the stop ids before min_tokens

    @property
    def adjusts(self) -> bool:
        return self.params.penalized or bool(self.banned)


def make_generator(params: SamplingParams, device) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def adjust_(row: torch.Tensor, c: Controls) -> None:
    """row [V] in place: transformers' RepetitionPenaltyLogitsProcessor, then vLLM's frequency and
    presence penalties over the output, then the bans (MinNewTokensLengthLogitsProcessor)."""
    p = c.params
    if p.repetition_penalty != 1.0 and c.tokens:
        ids = torch.tensor(c.tokens, device=row.device)
        score = row.gather(0, ids)
        row.scatter_(0, ids, torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty))
    if (p.frequency_penalty or p.presence_penalty) and c.output:
        counts = torch.bincount(torch.tensor(c.output, device=row.device), minlength=row.shape[0]).to(row.dtype)
        row -= p.frequency_penalty * counts
        row -= p.presence_penalty * (counts > 0).to(row.dtype)
    if c.banned:
        row[list(c.banned)] = float("-inf")


def filtered_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [V] -> temperature-scaled logits with everything outside top-k / top-p set to -inf."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= params.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, controls: list[Controls]) -> tuple[list[int | None], list[float]]:
    """logits [B, V] fp32 -> (token, log-prob of that token under the model, before penalties and
    temperature) per sequence; the token is None where the sequence's logits are not all finite (no
    token can be drawn from them)."""
    finite = torch.isfinite(logits).all(-1).tolist()
    logprobs = torch.log_softmax(logits, -1)
    if any(c.adjusts for c in controls):
        logits = logits.clone()
        for row, c in zip(logits, controls):
            if c.adjusts:
                adjust_(row, c)
    tokens = torch.argmax(logits, -1)
    for i, c in enumerate(controls):
        if finite[i] and not c.params.greedy:
            probs = torch.softmax(filtered_logits(logits[i], c.params), -1)
            tokens[i] = torch.multinomial(probs, 1, generator=c.generator)[0]
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    return [t if ok else None for t, ok in zip(tokens.tolist(), finite)], chosen.tolist()
