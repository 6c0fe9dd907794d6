"""Tokenizer for the text models: `tokenizers` on tokenizer.json (no torch in those processes),
transformers' AutoTokenizer only for a model that has no tokenizer.json."""

import functools
import json
import re
from pathlib import Path

from backend.config import context_length
from backend.errors import invalid

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # fast, SentencePiece, GPT-2 BPE


def has_tokenizer(model_dir: Path) -> bool:
    return any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES)


class TextCodec:
    def __init__(self, model_dir: Path, max_model_len: int = 0):
        path = Path(model_dir) / "tokenizer.json"
        if not has_tokenizer(model_dir):
            raise ValueError(f"base model folder {model_dir} has no tokenizer (tokenizer.json or tokenizer.model)")
        if path.is_file():
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(path))
            self._encode = lambda text, special=True: self.tokenizer.encode(text, add_special_tokens=special).ids
        else:
            from transformers import AutoTokenizer

            try:
                self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            except Exception as e:
                raise ValueError(f"base model folder {model_dir}: its tokenizer does not load: {e}") from e
            self._encode = lambda text, special=True: self.tokenizer(text, add_special_tokens=special).input_ids
        self._short = functools.lru_cache(maxsize=1 << 16)(self._text)
        with_special, plain = self._encode("a"), self._encode("a", False)
        self.bos = with_special[0] if with_special[:1] != plain[:1] else None
        # Decoders of SentencePiece models drop the leading space of what they decode: decode a
        # continuation behind an anchor token and cut the anchor's text off again.
        self.anchor = plain[-1]
        self.anchor_text = self._decode([self.anchor])
        # SentencePiece byte-fallback tokens: a later one can turn an earlier one's text into U+FFFD
        vocab = self.tokenizer.get_vocab()
        self.byte_tokens = {i for t, i in vocab.items() if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t)}
        # No token stands for more text than its vocabulary entry's UTF-8 bytes (byte-level and
        # SentencePiece entries spell each byte with one or more bytes): text longer than this
        # cannot fit the context, whatever it tokenizes to.
        longest = max(len(t.encode()) for t in vocab)
        config = Path(model_dir) / "config.json"
        model_config = json.loads(config.read_text()) if config.is_file() else {}
        self.max_text_bytes = context_length(model_config, max_model_len) * longest

    def encode(self, text: str, special: bool = True) -> list[int]:
        """special: with the tokenizer's added tokens (BOS); a chat template writes its own."""
        return self._encode(text, special)

    def encode_prompt(self, text: str, special: bool = True) -> list[int]:
        """encode, refusing text too long for any prompt before the tokenizer spends time on it."""
        if self.max_text_bytes and len(text) * 4 > self.max_text_bytes:  # 4 = most UTF-8 bytes per char
            size = len(text.encode())
            if size > self.max_text_bytes:
                raise invalid(
                    f"text_input of {size} bytes cannot fit the context (at most {self.max_text_bytes} bytes)"
                )
        return self._encode(text, special)

    def decode(self, ids) -> str:
        """Text of `ids`: a whole sequence if it starts with BOS, else a continuation of one. Runs of one
        or two tokens, which streaming decodes over and over, are remembered."""
        ids = tuple(ids)
        return self._short(ids) if len(ids) <= 2 else self._text(ids)

    def _text(self, ids: tuple[int, ...]) -> str:
        if not ids or ids[0] == self.bos:
            return self._decode(list(ids))
        return self._decode([self.anchor, *ids])[len(self.anchor_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class StreamChunker:
    """Groups streamed tokens so that each group, decoded on its own (as the postprocessing model
    does), is exactly the text it adds. A token that ends inside a UTF-8 character, has no text (a
    special token), is a byte-fallback token, or whose text depends on the next token waits, but no
    more than `max_hold` tokens wait (None: no limit, as vLLM's detokenizer): past that, the longest run
    of them that decodes to whole text goes out (or all of them, where none does). The final group is
    always sent."""

    CONTEXT = 8  # tokens already sent that the check decodes in front of the held ones

    def __init__(self, codec: TextCodec, max_hold: int | None = 4):
        self.codec = codec
        self.max_hold = max_hold
        self.sent: list[int] = []
        self.sent_text = ""  # codec.decode(self.sent)
        self.ids: list[int] = []
        self.log_probs: list[float] = []

    def add(self, ids: list[int], log_probs: list[float], final: bool) -> tuple[list[int], list[float]] | None:
        self.ids += ids
        self.log_probs += log_probs
        if final or self._complete(self.ids):
            n = len(self.ids)
        elif self.max_hold is not None and len(self.ids) > self.max_hold:
            n = next((k for k in range(len(self.ids) - 1, 0, -1) if self._whole(self.ids[:k])), len(self.ids))
        else:
            return None
        out = (self.ids[:n], self.log_probs[:n])
        self.sent = (self.sent + out[0])[-self.CONTEXT :]
        self.sent_text = self.codec.decode(self.sent)
        self.ids, self.log_probs = self.ids[n:], self.log_probs[n:]
        return out

    def _complete(self, ids: list[int]) -> bool:
        if self.codec.byte_tokens:  # a later byte-fallback token can still turn this one's text into U+FFFD
            last = next((i for i in reversed(ids) if self.codec.decode([i]) != ""), None)  # special tokens: no text
            if last in self.codec.byte_tokens:
                return False
        return self._whole(ids)

    def _whole(self, ids: list[int]) -> bool:
        decode = self.codec.decode
        text = decode(ids)
        return text != "" and not text.endswith("\ufffd") and decode(self.sent + ids) == self.sent_text + text


MAX_STOP_STRINGS = 4


class StopStrings:
    """Finds the first stop string in generated text as it arrives in pieces. `add` returns the text
    that can go out (none of it can begin a stop string) and whether a stop string was found; the
    text is then cut before it. What may still begin one is held until the final piece."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def add(self, piece: str, final: bool = False) -> tuple[str, bool]:
        text = self.held + piece
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.held = ""
            return text[: min(found)], True
        prefixes = (k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k]))
        keep = 0 if final else max(prefixes, default=0)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False


def check_stop_strings(stops: list[str]) -> list[str]:
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    if any(not s for s in stops):
        raise invalid("a stop string is empty")
    return stops
