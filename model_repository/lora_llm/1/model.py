"""Token-level LoRA LLM: Triton tensors <-> backend requests; the engine does the work."""

import numpy as np
import triton_python_backend_utils as pb_utils

from backend import triton_io as io
from backend.config import EngineConfig
from backend.engine import Engine, Output
from backend.errors import RequestError
from backend.metrics import TritonMetrics
from backend.request import GenerationRequest, parse_request
from backend.text import StreamChunker, TextCodec


class TritonPythonModel:
    def initialize(self, args):
        cfg = EngineConfig.from_parameters(io.parameters(args))
        self.engine = Engine(cfg, TritonMetrics(pb_utils, args["model_name"])).start()
        self.codec = TextCodec(cfg.base_model)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                req = parse_request(io.inputs(request), self.engine.limits)
                req.is_cancelled = sender.is_cancelled
                self.engine.submit(req, Responder(sender, req, self.codec).send)
            except RequestError as e:
                sender.send(io.error_response(e), flags=io.FINAL)
        return None

    def finalize(self):
        self.engine.shutdown()


class Responder:
    """Sends one request's outputs; streamed tokens go out in groups that decode to whole characters."""

    def __init__(self, sender, req: GenerationRequest, codec: TextCodec):
        self.sender = sender
        self.prefix = req.input_ids if req.echo_prompt else []
        self.chunker = StreamChunker(codec) if req.stream else None

    def send(self, out: Output) -> None:
        if out.error is not None:
            self.sender.send(io.error_response(out.error), flags=io.FINAL)
            return
        ids, log_probs = self.prefix + out.token_ids, out.log_probs
        if self.chunker:
            chunk = self.chunker.add(ids, log_probs, final=out.finish_reason is not None)
            if chunk is None:
                return
            ids, log_probs = chunk
        response = pb_utils.InferenceResponse(
            output_tensors=[
                io.tensor("output_ids", ids, np.int64),
                io.tensor("output_log_probs", log_probs, np.float32),
                io.tensor("finish_reason", [out.finish_reason or ""], np.object_),
            ]
        )
        self.sender.send(response, flags=io.FINAL if out.finish_reason else 0)
