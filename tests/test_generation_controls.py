"""Generation controls in the engine, held against transformers' generate on PEFT's model (fp32, greedy):
every end-of-turn id of the model, ignore_eos, min_tokens, and the repetition, presence and frequency
penalties, all in mixed batches."""

import json
import shutil

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from backend.engine.request import SamplingParams
from backend.serving.request_tensors import parse_request
from tests.conftest import peft_generate
from tests.test_engine import make_engine, prompts, request, run_all


class OutputPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties as vLLM applies them: over the generated tokens only."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        out = input_ids[:, self.prompt_len :]
        counts = torch.zeros_like(scores).scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
        scores = scores.clone()
        scores -= self.frequency * counts
        scores -= self.presence * (counts > 0).to(scores.dtype)
        return scores


def reference(model, ids, adapter, max_tokens, params: SamplingParams, end_id=None, min_tokens=0) -> list[int]:
    kw = {}
    if params.repetition_penalty != 1.0:
        kw["repetition_penalty"] = params.repetition_penalty
    if params.presence_penalty or params.frequency_penalty:
        penalties = OutputPenalties(len(ids), params.presence_penalty, params.frequency_penalty)
        kw["logits_processor"] = LogitsProcessorList([penalties])
    if min_tokens:
        kw["min_new_tokens"] = min_tokens
    return peft_generate(model, ids, adapter, max_tokens, end_id, **kw)


def repeating(model, vocab: int, adapter: str, seed: int) -> list[int]:
    """A prompt whose plain greedy continuation (16 tokens) repeats one of its own tokens: there the
    penalties change what is generated."""
    for k in range(seed, seed + 100):
        ids = prompts(vocab, [5 + k % 7], seed=k)[0]
        out = peft_generate(model, ids, adapter, 16)
        if len(set(out)) < len(out):
            return ids
    raise AssertionError("no prompt repeats itself")


def test_every_eos_id_of_the_model_ends_a_sequence(assets, peft_model, vocab, engines, tmp_path):
    """generation_config.eos_token_id is a list (as Llama-3's [128001, 128008, 128009]): any of them
    ends a sequence, with no end_id given; ignore_eos runs on to max_tokens."""
    p = prompts(vocab, [7, 11, 5], seed=31)
    refs = [peft_generate(peft_model, ids, name, 12) for ids, name in zip(p, ["qv-r4", "", "mlp-r64"])]
    firsts = [next(k for k in range(3, 12) if ref[k] not in ref[:k]) for ref in refs[:2]]
    eos = [refs[0][firsts[0]], refs[1][firsts[1]]]
    eos += [t for t in range(4, vocab) if t not in refs[0] + refs[1] + refs[2]][:1]
    base = tmp_path / "base"
    shutil.copytree(assets / "base", base)
    config = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    engine = make_engine(base, assets / "adapters")
    engines.append(engine)
    assert engine.limits.eos_ids == tuple(eos)

    def parsed(ids, name, **more):
        values = {"input_ids": np.array([ids]), "lora_name": np.array([[name]], dtype=object)}
        values["max_tokens"] = np.array([[12]], dtype=np.int32)
        return parse_request(values | {k: np.array([[v]]) for k, v in more.items()}, engine.limits)

    names = ["qv-r4", "", "mlp-r64"]
    reqs = [parsed(ids, name) for ids, name in zip(p, names)]
    reqs += [parsed(ids, name, ignore_eos=True) for ids, name in zip(p, names)]
    outs = run_all(engine, reqs)
    for out, req in zip(outs[:3], reqs):
        assert out.final.token_ids == peft_generate(peft_model, req.input_ids, req.lora_name, 12, eos)
    assert [o.final.finish_reason for o in outs[:3]] == ["stop", "stop", "length"]
    assert [len(o.final.token_ids) for o in outs[:2]] == [k + 1 for k in firsts]
    assert [o.final.token_ids for o in outs[3:]] == refs
    assert [o.final.finish_reason for o in outs[3:]] == ["length"] * 3


def test_penalties_and_min_tokens_match_transformers(assets, peft_model, vocab, engines):
    """Each request of one mixed batch equals generate with the same logits processors: transformers'
    RepetitionPenaltyLogitsProcessor (prompt and output), vLLM's presence and frequency penalties
    (output only) and MinNewTokensLengthLogitsProcessor."""
    p = prompts(vocab, [6, 9, 4, 12], seed=33)
    plain = [peft_generate(peft_model, ids, "qv-r4", 16) for ids in p]
    cases = [
        ("qv-r4", SamplingParams(repetition_penalty=1.5)),
        ("", SamplingParams(repetition_penalty=0.75)),
        ("mlp-r64", SamplingParams(frequency_penalty=1.5)),
        ("all-r16-pattern", SamplingParams(presence_penalty=2.0)),
        ("attn-r8-rslora", SamplingParams(presence_penalty=-0.5, frequency_penalty=2.0)),
        ("qv-r4", SamplingParams(repetition_penalty=1.25, presence_penalty=1.0, frequency_penalty=0.5)),
    ]
    cases = [(repeating(peft_model, vocab, name, seed=40 + 10 * i), name, sp) for i, (name, sp) in enumerate(cases)]
    cases.append((p[2], "", SamplingParams()))
    reqs = [request(ids, name, 16, sampling=params) for ids, name, params in cases]
    end = plain[3][1]  # generated second without a minimum: min_tokens=5 holds it back until the 6th
    reqs.append(request(p[3], "qv-r4", 16, end_id=end, min_tokens=5))
    reqs.append(request(p[3], "qv-r4", 16, end_id=end))
    reqs.append(request(p[0], "", 16, sampling=SamplingParams(temperature=0.8, seed=3, frequency_penalty=1.0)))
    engine = make_engine(assets / "base", assets / "adapters")
    engines.append(engine)
    outs = run_all(engine, reqs)
    for out, (ids, name, params) in zip(outs, cases):
        assert out.final.token_ids == reference(peft_model, ids, name, 16, params), (name, params)
    for out, (ids, name, _) in zip(outs[:6], cases):
        assert out.final.token_ids != peft_generate(peft_model, ids, name, 16), f"no effect on {name}: proves little"
    held, free = outs[7].final.token_ids, outs[8].final.token_ids
    assert free == plain[3][:2] and outs[8].final.finish_reason == "stop"
    assert len(held) >= 6 and end not in held[:5]
    assert held == reference(peft_model, p[3], "qv-r4", 16, SamplingParams(), end_id=end, min_tokens=5)
    assert len(outs[9].final.token_ids) == 16
