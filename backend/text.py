"""Tokenizer for the text models: `tokenizers` on tokenizer.json (no torch in those processes),
transformers' AutoTokenizer only for a model that has no tokenizer.json."""

import re
from pathlib import Path


class TextCodec:
    def __init__(self, model_dir: Path):
        path = Path(model_dir) / "tokenizer.json"
        if path.is_file():
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(path))
            self._encode = lambda text, special=True: self.tokenizer.encode(text, add_special_tokens=special).ids
        else:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            self._encode = lambda text, special=True: self.tokenizer(text, add_special_tokens=special).input_ids
        with_special, plain = self._encode("a"), self._encode("a", False)
        self.bos = with_special[0] if with_special[:1] != plain[:1] else None
        # Decoders of SentencePiece models drop the leading space of what they decode: decode a
        # continuation behind an anchor token and cut the anchor's text off again.
        self.anchor = plain[-1]
        self.anchor_text = self._decode([self.anchor])
        # SentencePiece byte-fallback tokens: a later one can turn an earlier one's text into U+FFFD
        self.byte_tokens = {i for t, i in self.tokenizer.get_vocab().items() if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t)}

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def decode(self, ids) -> str:
        """Text of `ids`: a whole sequence if it starts with BOS, else a continuation of one."""
        ids = list(ids)
        if not ids or ids[0] == self.bos:
            return self._decode(ids)
        return self._decode([self.anchor, *ids])[len(self.anchor_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class StreamChunker:
    """Groups streamed tokens so that each group, decoded on its own (as the postprocessing model
    does), is exactly the text it adds: a token that ends inside a UTF-8 character, has no text
    (a special token), is a byte-fallback token, or whose text depends on the next token, waits. The final group is
    always sent (it can differ only where the output ends inside a broken byte sequence)."""

    def __init__(self, codec: TextCodec):
        self.codec = codec
        self.sent: list[int] = []
        self.ids: list[int] = []
        self.log_probs: list[float] = []

    def add(self, ids: list[int], log_probs: list[float], final: bool) -> tuple[list[int], list[float]] | None:
        self.ids += ids
        self.log_probs += log_probs
        if not (final or self._complete()):
            return None
        out = (self.ids, self.log_probs)
        self.sent += self.ids
        self.ids, self.log_probs = [], []
        return out

    def _complete(self) -> bool:
        decode = self.codec.decode
        visible = [i for i in self.ids if self.codec.decode([i]) != ""]  # special tokens have no text
        if visible and visible[-1] in self.codec.byte_tokens:
            return False
        text = decode(self.ids)
        # against everything sent so far: a run of byte tokens can reach far back
        return text != "" and not text.endswith("\ufffd") and decode(self.sent + self.ids) == decode(self.sent) + text
