"""backend/serving/request_tensors.py (parse_request, scalar) and backend/serving/text.py (TextCodec, StreamChunker)."""

import json
import random

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from backend.engine.request import Limits
from backend.errors import RequestError
from backend.serving.request_tensors import parse_request, scalar
from backend.serving.text import StopStrings, StreamChunker, TextCodec, check_stop_strings
from demo.builders import corpus

LIMITS = Limits(vocab_size=100, max_model_len=32, default_max_tokens=16, max_tokens_limit=20, eos_ids=(2, 7))


def ids(*values) -> np.ndarray:
    return np.array([values], dtype=np.int64)  # [1, L]


def one(value, dtype) -> np.ndarray:
    return np.array([[value]], dtype=dtype)  # [1, 1]


def name(value) -> np.ndarray:
    return np.array([[value]], dtype=object)


def test_defaults():
    req = parse_request({"input_ids": ids(1, 5, 7)}, LIMITS)
    assert req.input_ids == [1, 5, 7]
    assert req.max_tokens == 16
    assert req.lora_name == ""
    assert req.sampling.greedy and req.sampling.temperature == 0
    assert (req.sampling.top_p, req.sampling.top_k, req.sampling.seed) == (1.0, 0, None)
    assert req.stop_ids == LIMITS.eos_ids and req.min_tokens == 0
    assert not req.stream and not req.echo_prompt


@pytest.mark.parametrize("prompt_len, expected", [(1, 16), (16, 16), (20, 12), (31, 1)])
def test_default_max_tokens_clipped_to_context(prompt_len, expected):
    assert parse_request({"input_ids": ids(*[5] * prompt_len)}, LIMITS).max_tokens == expected


def test_explicit_inputs():
    req = parse_request(
        {
            "input_ids": ids(3, 4),
            "lora_name": name(b"qv-r4"),
            "max_tokens": one(5, np.int32),
            "temperature": one(0.7, np.float32),
            "top_p": one(0.9, np.float32),
            "top_k": one(40, np.int32),
            "seed": one(2**63 + 5, np.uint64),
            "end_id": one(-1, np.int32),
            "stream": one(True, bool),
        },
        LIMITS,
    )
    assert (req.lora_name, req.max_tokens, req.stop_ids, req.stream) == ("qv-r4", 5, (), True)
    assert not req.sampling.greedy
    assert req.sampling.temperature == pytest.approx(0.7) and req.sampling.top_p == pytest.approx(0.9)
    assert (req.sampling.top_k, req.sampling.seed) == (40, 2**63 + 5)


def test_generation_controls():
    req = parse_request(
        {
            "input_ids": ids(3, 4),
            "max_tokens": one(6, np.int32),
            "min_length": one(6, np.int32),
            "presence_penalty": one(-0.5, np.float32),
            "frequency_penalty": one(2.0, np.float32),
            "repetition_penalty": one(1.25, np.float32),
        },
        LIMITS,
    )
    assert req.min_tokens == 6 and req.stop_ids == (2, 7)
    assert (req.sampling.presence_penalty, req.sampling.frequency_penalty) == (-0.5, 2.0)
    assert req.sampling.repetition_penalty == 1.25 and req.sampling.penalized and req.sampling.greedy
    assert not parse_request({"input_ids": ids(3)}, LIMITS).sampling.penalized


@pytest.mark.parametrize(
    "inputs, stop_ids",
    [
        ({}, (2, 7)),
        ({"end_id": one(9, np.int32)}, (9,)),
        ({"end_id": one(-1, np.int32)}, ()),
        ({"ignore_eos": one(True, bool)}, ()),
        ({"ignore_eos": one(False, bool)}, (2, 7)),
        ({"ignore_eos": one(True, bool), "end_id": one(9, np.int32)}, ()),
    ],
)
def test_stop_ids(inputs, stop_ids):
    assert parse_request({"input_ids": ids(3), **inputs}, LIMITS).stop_ids == stop_ids


@pytest.mark.parametrize("value", [b"", "", b"a", "A.b_c-1", np.bytes_(b"qv-r4"), "a" * 128])
def test_lora_name(value):
    expected = value.decode() if isinstance(value, bytes) else value
    assert parse_request({"input_ids": ids(1), "lora_name": name(value)}, LIMITS).lora_name == expected


def test_ids_without_batch_dim():
    assert parse_request({"input_ids": np.array([1, 2], np.int64)}, LIMITS).input_ids == [1, 2]


@pytest.mark.parametrize(
    "stream, exclude, echo", [(False, False, True), (True, False, False), (False, True, False), (False, None, False)]
)
def test_echo_prompt(stream, exclude, echo):
    inputs = {"input_ids": ids(1, 2), "stream": one(stream, bool)}
    if exclude is not None:
        inputs["exclude_input_in_output"] = one(exclude, bool)
    assert parse_request(inputs, LIMITS).echo_prompt is echo


@pytest.mark.parametrize(
    "inputs",
    [
        {"input_ids": np.zeros((1, 0), np.int64)},
        {"input_ids": ids(1, 100)},
        {"input_ids": ids(-1, 5)},
        {"input_ids": np.array([[1, 2], [3, 4]], np.int64)},
        {"input_ids": np.array([[[1, 2]]], np.int64)},
        {"input_ids": ids(*[5] * 32)},
        {"input_ids": ids(*[5] * 40)},
        {"max_tokens": one(0, np.int32)},
        {"max_tokens": one(-3, np.int32)},
        {"max_tokens": one(21, np.int32)},
        {"max_tokens": np.array([[5, 6]], np.int32)},
        {"input_ids": ids(*[5] * 20), "max_tokens": one(13, np.int32)},
        {"temperature": one(-0.1, np.float32)},
        {"temperature": one(np.nan, np.float32)},
        {"temperature": one(np.inf, np.float32)},
        {"top_p": one(0.0, np.float32)},
        {"top_p": one(1.5, np.float32)},
        {"top_p": one(np.nan, np.float32)},
        {"top_k": one(-1, np.int32)},
        {"min_length": one(-1, np.int32)},
        {"min_length": one(17, np.int32)},
        {"max_tokens": one(3, np.int32), "min_length": one(4, np.int32)},
        {"presence_penalty": one(2.5, np.float32)},
        {"frequency_penalty": one(-2.01, np.float32)},
        {"frequency_penalty": one(np.nan, np.float32)},
        {"repetition_penalty": one(0.0, np.float32)},
        {"repetition_penalty": one(-1.0, np.float32)},
        {"repetition_penalty": one(np.inf, np.float32)},
        {"lora_name": name(b"../x")},
        {"lora_name": name(b"a/b")},
        {"lora_name": name(b"/etc")},
        {"lora_name": name(b".hidden")},
        {"lora_name": name(b"-x")},
        {"lora_name": name(b"a" * 129)},
        {"lora_name": name(b"a\n")},
        {"lora_name": name(b"\xff\xfe")},
        {"lora_name": name("caf\u00e9".encode("latin-1"))},
    ],
    ids=lambda d: ",".join(f"{k}={v.reshape(-1)[:3].tolist()}{list(v.shape)}" for k, v in d.items()),
)
def test_invalid(inputs):
    with pytest.raises(RequestError) as e:
        parse_request({"input_ids": ids(1, 2, 3), **inputs}, LIMITS)
    assert e.value.code == "INVALID_ARG"


@pytest.mark.parametrize("prompt_len, max_tokens", [(12, 20), (20, 12), (1, 1), (31, 1)])
def test_max_tokens_at_limits(prompt_len, max_tokens):
    inputs = {"input_ids": ids(*[5] * prompt_len), "max_tokens": one(max_tokens, np.int32)}
    assert parse_request(inputs, LIMITS).max_tokens == max_tokens


@pytest.mark.parametrize(
    "array, kind, expected",
    [(one(3, np.int32), int, 3), (one(0.5, np.float32), float, 0.5), (name(b"caf\xc3\xa9"), None, "caf\u00e9")],
)
def test_scalar(array, kind, expected):
    value = scalar({"x": array}, "x", kind)
    assert value == expected and type(value) is type(expected)
    assert scalar({}, "x", kind, "absent") == "absent"


def test_scalar_strict_or_first():
    """Strict (the lora_llm contract): one value or an error; else the first of any, default if none."""
    two, empty = np.array([[4, 5]], np.int32), np.zeros((1, 0), np.int32)
    assert (scalar({"x": two}, "x", strict=False), scalar({"x": empty}, "x", default=9, strict=False)) == (4, 9)
    for array in (two, empty):
        with pytest.raises(RequestError, match=r"x must hold one value, got shape \[1, \d\]"):
            scalar({"x": array}, "x")
    for strict in (True, False):
        with pytest.raises(RequestError, match="x is not valid UTF-8"):
            scalar({"x": name(b"\xff")}, "x", strict=strict)


@pytest.fixture(scope="module")
def codec(assets) -> TextCodec:
    return TextCodec(assets / "base")


@pytest.fixture(scope="module")
def slow_codec(assets, tmp_path_factory) -> TextCodec:
    """The same vocabulary as vocab.json + merges.txt and no tokenizer.json: AutoTokenizer's GPT2Tokenizer."""
    folder = tmp_path_factory.mktemp("slow")
    Tokenizer.from_file(str(assets / "base" / "tokenizer.json")).model.save(str(folder))
    cfg = json.loads((assets / "base" / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "GPT2Tokenizer"}))
    return TextCodec(folder)


TEXTS = ["Hello, world!", "  two spaces\tand a tab\n", "h\u00e9llo w\u00f6rld \u20ac \u65e5\u672c\u8a9e \U0001f642", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_codec_round_trip(codec, text):
    ids = codec.encode(text)
    assert codec.decode(ids) == text
    assert codec.decode([1, *ids, 2, 3]) == text


@pytest.mark.parametrize("text", TEXTS)
def test_codec_without_tokenizer_json(codec, slow_codec, text):
    assert not isinstance(slow_codec.tokenizer, Tokenizer)
    ids = slow_codec.encode(text)
    assert ids == [i for i in codec.encode(text) if i != 1]  # the fast one adds <s>
    assert slow_codec.decode([1, *ids, 2]) == text


@pytest.fixture(scope="module")
def sentencepiece_codec(tmp_path_factory) -> TextCodec:
    """A Llama-2-style tokenizer.json: "▁" for spaces, byte-fallback tokens <0xNN>, and a decoder that strips
    the leading space of what it decodes (Replace, ByteFallback, Fuse, Strip), as Llama-2, Mistral, TinyLlama."""
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.train_from_iterator(
        corpus(), trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens])
    )
    state = json.loads(tok.to_str())
    state["added_tokens"] = state["added_tokens"][:3]  # byte tokens are vocabulary, not special tokens
    state["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    folder = tmp_path_factory.mktemp("sentencepiece")
    (folder / "tokenizer.json").write_text(json.dumps(state))
    return TextCodec(folder)


@pytest.fixture(params=["byte-level", "sentencepiece"])
def any_codec(request) -> TextCodec:
    return request.getfixturevalue({"byte-level": "codec", "sentencepiece": "sentencepiece_codec"}[request.param])


def stream(chunker: StreamChunker, ids: list[int], log_probs: list[float]) -> list[tuple[list[int], list[float], bool]]:
    """Feeds tokens one at a time (final=True on the last) -> (ids, log_probs, final) of each chunk returned."""
    chunks = []
    for i, (t, lp) in enumerate(zip(ids, log_probs)):
        final = i == len(ids) - 1
        out = chunker.add([t], [lp], final)
        if final:
            assert out is not None
        if out is not None:
            chunks.append((*out, final))
    return chunks


def text_ids(codec: TextCodec, text: str) -> list[int]:
    return [i for i in codec.encode(text) if i != 1]  # without <s>


def random_sequences(codec: TextCodec, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    vocab = codec.tokenizer.get_vocab_size()
    partial = [i for i in range(vocab) if codec.decode([i]).endswith("\ufffd")]
    special = [i for i in range(vocab) if codec.decode([i]) == ""]
    assert len(partial) > 32 and special
    # runs of tokens that, together, spell multi-byte characters or words after a space
    runs = [text_ids(codec, t) for t in ["\u00e9", " \u20ac", "\u65e5\u672c", "\U0001f642!", " w\u00f6rld", "a b"]]
    pools = [lambda: [rng.choice(partial)], lambda: [rng.choice(special)], lambda: [rng.randrange(vocab)]]
    pools.append(lambda: rng.choice(runs))
    seqs = []
    for _ in range(n):
        seq = []
        for _ in range(rng.randint(1, 12)):
            seq += rng.choice(pools)()
        seqs.append(seq)
    return seqs


def test_stream_chunks_decode_to_the_whole(any_codec):
    """With no bound on what waits, the chunks decoded one by one are exactly the whole text."""
    codec = any_codec
    for ids in random_sequences(codec, 300):
        log_probs = [-0.5 * i for i in range(len(ids))]
        chunks = stream(StreamChunker(codec, max_hold=len(ids)), ids, log_probs)
        assert "".join(codec.decode(c) for c, _, _ in chunks) == codec.decode(ids), ids
        assert all(codec.decode(c) for c, _, final in chunks if not final), ids
        assert [t for c, _, _ in chunks for t in c] == ids
        assert [lp for _, lps, _ in chunks for lp in lps] == log_probs
        assert all(len(c) == len(lps) for c, lps, _ in chunks)


def test_stream_holds_back_at_most_a_few_tokens(any_codec):
    """Runs of byte and special tokens that never complete a character wait at most max_hold tokens:
    past that, what is held goes out as it is. Every token and log-prob still goes out once, in order."""
    codec = any_codec
    partial = [i for i in range(codec.tokenizer.get_vocab_size()) if codec.decode([i]).endswith("\ufffd")]
    rng = random.Random(3)
    for ids in [[rng.choice(partial) for _ in range(40)], *random_sequences(codec, 100, seed=4)]:
        log_probs = [-0.25 * i for i in range(len(ids))]
        chunks = stream(StreamChunker(codec, max_hold=4), ids, log_probs)
        assert all(len(c) <= 5 for c, _, _ in chunks), [len(c) for c, _, _ in chunks]
        assert [t for c, _, _ in chunks for t in c] == ids
        assert [lp for _, lps, _ in chunks for lp in lps] == log_probs


@pytest.mark.parametrize("text", TEXTS[:3])
def test_stream_sends_each_character_once_complete(any_codec, text):
    ids = text_ids(any_codec, text)
    whole = any_codec.decode(ids)
    assert whole.lstrip() == text.lstrip()  # ids without <s> are a continuation: SentencePiece keeps the space
    chunks = stream(StreamChunker(any_codec), ids, [0.0] * len(ids))
    texts = [any_codec.decode(c) for c, _, _ in chunks]
    assert "".join(texts) == whole
    assert not any("\ufffd" in t for t in texts)


@pytest.mark.parametrize(
    "text, stops, expected",
    [
        ("Hello world. Bye", ["."], ("Hello world", True)),
        ("Hello world. Bye", ["wor", "lo"], ("Hel", True)),
        ("Hello world", ["xyz"], ("Hello world", False)),
        ("aaab", ["aab"], ("a", True)),
        ("abcabd", ["abd", "cab"], ("ab", True)),
        ("x\u00e9\u4e2dy", ["\u4e2d"], ("x\u00e9", True)),
        ("ends with a partial sto", ["stop"], ("ends with a partial sto", False)),
    ],
)
def test_stop_strings_in_any_pieces(text, stops, expected):
    """However the text is split, what goes out is the text before the earliest stop string, and
    nothing that goes out before the end could still begin one."""
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), k=rng.randrange(0, min(6, len(text) - 1))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        matcher, out, hit = StopStrings(stops), "", False
        for piece in pieces:
            released, hit = matcher.add(piece)
            out += released
            if hit:
                break
            assert expected[0].startswith(out) and out + matcher.held == text[: len(out + matcher.held)]
        if not hit:
            out += matcher.add("", final=True)[0]
        assert (out, hit) == expected, pieces


def test_stop_strings_are_checked():
    assert check_stop_strings(["a", "b"]) == ["a", "b"]
    for bad in (["a"] * 5, ["a", ""]):
        with pytest.raises(RequestError):
            check_stop_strings(bad)
