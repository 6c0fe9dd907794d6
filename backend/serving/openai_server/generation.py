"""One generation as text: lora_llm's token pieces grouped into whole characters, stop strings looked
for in the generated text only (never across the prompt), and the generation cancelled at the first."""

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from backend.serving.openai_server.engine_client import EngineClient, Piece
from backend.serving.text import StopStrings, StreamChunker, TextCodec


@dataclass
class Delta:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # the tokens received with it (usage counts them)
    log_probs: list[float] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" on the last one

    def extend(self, later: "Delta") -> "Delta":
        self.text += later.text
        self.token_ids += later.token_ids
        self.log_probs += later.log_probs
        self.finish_reason = later.finish_reason
        return self


class Detokenizer:
    def __init__(self, codec: TextCodec, stops: list[str]):
        self.codec = codec
        self.chunker = StreamChunker(codec, max_hold=None)  # never a broken character
        self.stops = StopStrings(stops) if stops else None

    def add(self, piece: Piece) -> Delta:
        """The text of a piece, as far as it is whole and cannot begin a stop string. The tokens go in one
        at a time, so the text does not depend on how lora_llm grouped them into responses, and the delta
        that finds a stop string ends with the token that completed it."""
        ids, logprobs, finish = piece.token_ids, piece.log_probs, piece.finish_reason
        steps = [(ids[i : i + 1], logprobs[i : i + 1], bool(finish) and i == len(ids) - 1) for i in range(len(ids))]
        steps = steps or [([], [], bool(finish))]
        delta = Delta()
        for step_ids, step_logprobs, last in steps:
            delta.token_ids += step_ids
            delta.log_probs += step_logprobs
            group = self.chunker.add(step_ids, step_logprobs, last)
            if group is None:
                continue
            text = self.codec.decode(group[0])
            if self.stops is not None:
                text, hit = self.stops.add(text, final=last)
                if hit:
                    delta.text += text
                    delta.finish_reason = "stop"
                    return delta
            delta.text += text
        delta.finish_reason = finish or None
        return delta


async def generate_text(
    engine: EngineClient, codec: TextCodec, ids: list[int], lora_name: str, model: str, inputs: dict, stops: list[str]
) -> AsyncIterator[Delta]:
    """Deltas until one carries a finish_reason, each with text (tokens whose text is held back go with the
    next); leaving early (or a stop string) cancels the generation."""
    detok = Detokenizer(codec, stops)
    pieces = engine.generate(ids, lora_name, model, inputs)
    held = Delta()
    try:
        async for piece in pieces:
            delta = detok.add(piece)
            held.extend(delta)
            if held.text or held.finish_reason:
                yield held
                held = Delta()
            if delta.finish_reason:
                return
    finally:
        await pieces.aclose()
