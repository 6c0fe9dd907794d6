"""Next-token choice: greedy for the whole batch at once, seeded sampling per sequence."""

import torch

from backend.request import SamplingParams


def make_generator(params: SamplingParams, device) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


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


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> tuple[list[int | None], list[float]]:
    """logits [B, V] fp32 -> (token, log-prob of that token under the model) per sequence; the token
    is None where the sequence's logits are not all finite (no token can be drawn from them)."""
    finite = torch.isfinite(logits).all(-1).tolist()
    logprobs = torch.log_softmax(logits, -1)
    tokens = torch.argmax(logits, -1)
    for i, (p, gen) in enumerate(zip(params, generators)):
        if finite[i] and not p.greedy:
            probs = torch.softmax(filtered_logits(logits[i], p), -1)
            tokens[i] = torch.multinomial(probs, 1, generator=gen)[0]
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    return [t if ok else None for t, ok in zip(tokens.tolist(), finite)], chosen.tolist()
