"""Tokenizer for the text models: `tokenizers` on tokenizer.json (no torch in those processes),
transformers' AutoTokenizer only for a model that has no tokenizer.json."""

from pathlib import Path


class TextCodec:
    def __init__(self, model_dir: Path):
        path = Path(model_dir) / "tokenizer.json"
        if path.is_file():
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(path))
            self._encode = lambda text: self.tokenizer.encode(text).ids
        else:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            self._encode = lambda text: self.tokenizer(text).input_ids

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


class StreamChunker:
    """Groups streamed tokens so that each group, decoded on its own (as the postprocessing model
    does), is exactly the text it adds: a token that ends inside a UTF-8 character, has no text
    (a special token), or whose text depends on the next token, waits for it. The final group is
    always sent."""

    def __init__(self, codec: TextCodec, context: int = 4):
        self.codec = codec
        self.context = context
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
        ctx = self.sent[-self.context :]
        text = decode(self.ids)
        return text != "" and not text.endswith("\ufffd") and decode(ctx + self.ids) == decode(ctx) + text
