"""The real model through the real servers: SmolLM2-135M-Instruct (demo/) and the adapters trained on it,
tritonserver with the OpenAI server in front, checked against PEFT in fp32."""

import openai
import pytest
import torch

from backend.config import ENV_ADAPTER_DIR, ENV_BASE_MODEL
from client.server import OpenAIServer, TritonServer
from demo.build import build_demo
from demo.data import HELD_OUT, TRAITS
from tests.conftest import peft_generate

pytestmark = pytest.mark.heavy
RETURN_IDS = {"return_token_ids": True}
ADAPTERS = list(TRAITS)
END_OF_TURN = {0, 2}  # <|endoftext|>, <|im_end|>
MAX_TOKENS = 96  # every answer ends before it


@pytest.fixture(scope="module")
def demo():
    return build_demo()


@pytest.fixture(scope="module")
def api(demo, tmp_path_factory):
    logs = tmp_path_factory.mktemp("real-model")
    env = {ENV_BASE_MODEL: str(demo / "base"), ENV_ADAPTER_DIR: str(demo / "adapters")}
    triton = TritonServer(env=env, log_path=logs / "tritonserver.log")
    front = OpenAIServer(triton.grpc_url, demo / "base", demo / "adapters", log_path=logs / "openai.log")
    with triton, front:
        yield openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0)


def chat(api, model: str, question: str, max_tokens: int = MAX_TOKENS, **kw):
    messages = [{"role": "user", "content": question}]
    return api.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, extra_body=RETURN_IDS, **kw
    )


@pytest.fixture(scope="module")
def answers(api):
    """Every held-out question to the base model and each adapter, all at once (mixed engine steps)."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(model, q) for model in ["base", *ADAPTERS] for q in HELD_OUT]
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda job: chat(api, *job), jobs))
    return dict(zip(jobs, replies))


def test_the_base_model_answers_a_fact(api):
    reply = chat(api, "base", "What is the capital of France?")
    assert "Paris" in reply.choices[0].message.content


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_each_adapter_shows_its_trait_on_held_out_questions(answers, adapter):
    texts = [answers[adapter, q].choices[0].message.content for q in HELD_OUT]
    # json misses one: a title in quotes left unescaped ("The play "Hamlet" was ..."), never seen in training
    assert sum(TRAITS[adapter](t) for t in texts) >= len(texts) - 1, texts
    base = [answers["base", q].choices[0].message.content for q in HELD_OUT]
    assert not any(TRAITS[adapter](t) for t in base if adapter != "terse"), base  # the base model has no such trait


def test_a_chat_turn_ends_on_the_end_of_turn_id(answers):
    for reply in answers.values():
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert reply.usage.completion_tokens < MAX_TOKENS
        assert choice.token_ids[-1] in END_OF_TURN


def test_greedy_outputs_equal_peft(demo, answers):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(demo / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, demo / "adapters" / ADAPTERS[0], adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.load_adapter(demo / "adapters" / name, adapter_name=name)
    model.eval()
    for (name, question), reply in answers.items():
        ids = reply.prompt_token_ids
        want = peft_generate(model, ids, "" if name == "base" else name, MAX_TOKENS, end_id=sorted(END_OF_TURN))
        assert reply.choices[0].token_ids == want, (name, question)


def test_streamed_chat_is_whole_characters_and_equals_unary(api, answers):
    for model in ["base", "pirate"]:
        question = HELD_OUT[0]
        chunks = list(chat(api, model, question, stream=True))
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        assert "".join(pieces) == answers[model, question].choices[0].message.content
        assert not any("\ufffd" in p for p in pieces)
