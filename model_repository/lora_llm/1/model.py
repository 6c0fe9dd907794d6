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
        self.outbox = io.Outbox()
        self.cancels = io.CancelWatch()
        self.engine = Engine(cfg, TritonMetrics(pb_utils, args["model_name"])).start()
        self.codec = TextCodec(cfg.base_model)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.submit(request, sender)
            except RequestError as e:
                sender.send(io.error_response(e), flags=io.FINAL)
        return None

    def submit(self, request, sender) -> None:
        values = io.inputs(request)
        req = parse_request(values, self.engine.limits)
        whole_chars = req.stream and io.scalar(values, "stream_whole_chars", False)
        respond = Responder(
            sender,
            req,
            outputs=set(request.requested_output_names()),
            codec=self.codec if whole_chars else None,
            outbox=self.outbox,
            cancels=self.cancels,
            metrics=self.engine.metrics,
        )
        try:
            self.engine.submit(req, respond)
        except RequestError:
            self.cancels.forget(req.id)
            raise

    def finalize(self):
        self.engine.shutdown()
        self.outbox.close()
        self.cancels.close()


class Responder:
    """One request's outputs, handed to the outbox by the engine thread. Streamed tokens go out one
    response each as they come, or together when sends fall behind; with stream_whole_chars (the
    ensemble's text streams) in groups that decode to whole characters."""

    def __init__(self, sender, req: GenerationRequest, *, outputs, codec, outbox, cancels, metrics):
        self.sender, self.id, self.outputs = sender, req.id, outputs
        self.prefix = req.input_ids if req.echo_prompt else []
        self.chunker = StreamChunker(codec) if codec else None
        self.outbox, self.cancels, self.metrics = outbox, cancels, metrics
        req.is_cancelled = cancels.watch(req.id, sender)

    def __call__(self, out: Output) -> None:
        self.outbox.put(self, out)

    def send(self, outs: list[Output]) -> None:
        """Outputs handed over since the last send, as one response."""
        out = outs[-1]
        if out.error is not None or out.finish_reason:
            self.cancels.forget(self.id)  # before the final response: Triton then frees the sender
            self.metrics.flush()  # a client that has its answer sees it counted
        if out.error is not None:
            self.sender.send(io.error_response(out.error), flags=io.FINAL)
            return
        ids = self.prefix + [t for o in outs for t in o.token_ids]
        log_probs = [p for o in outs for p in o.log_probs]
        self.prefix = []
        if self.chunker:
            chunk = self.chunker.add(ids, log_probs, final=out.finish_reason is not None)
            if chunk is None:
                return
            ids, log_probs = chunk
        values = {
            "output_ids": (ids, np.int64),
            "output_log_probs": (log_probs, np.float32),
            "finish_reason": ([out.finish_reason or ""], np.object_),
        }
        response = pb_utils.InferenceResponse(
            output_tensors=[io.tensor(name, *v) for name, v in values.items() if name in self.outputs]
        )
        self.sender.send(response, flags=io.FINAL if out.finish_reason else 0)
