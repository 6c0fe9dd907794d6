"""Token-level LoRA LLM: Triton tensors <-> backend requests; the engine does the work."""

import dataclasses

import numpy as np
import triton_python_backend_utils as pb_utils

from backend.config import EngineConfig, instance_device
from backend.engine.engine import Engine, Output
from backend.engine.request import GenerationRequest
from backend.errors import RequestError, internal, invalid
from backend.metrics import TritonMetrics
from backend.serving import triton_io as io
from backend.serving.request_tensors import parse_request, scalar
from backend.serving.text import StreamChunker, TextCodec, has_tokenizer


class TritonPythonModel:
    def initialize(self, args):
        cfg = EngineConfig.from_parameters(io.parameters(args))
        device, placed = instance_device(cfg.device, args)
        cfg = dataclasses.replace(cfg, device=device)
        self.base_model = cfg.base_model
        self.outbox = io.Outbox()
        self.cancels = io.CancelWatch()
        self.stops = io.StopFiles()
        self.engine = Engine(cfg, TritonMetrics(pb_utils, args["model_name"])).start()
        found = [placed, self.engine.runner.kv_summary, self.engine.warmup]
        io.log_settings(args["model_name"], cfg.as_parameters(), *filter(None, found))
        self.codec = TextCodec(cfg.base_model) if has_tokenizer(cfg.base_model) else None  # token ids need none
        self.stops.publish_pid("lora_llm")  # the front doors watch this process
        self.watch = io.ServerWatch(
            on_stopping=lambda: self.engine.begin_shutdown(cfg.shutdown_grace_seconds),
            alive=lambda: self.engine.serving,
        )

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            error = io.guarded(self.submit, request, sender)  # None once the engine has the request
            if error is not None:
                sender.send(error, flags=io.FINAL)
        return None

    def submit(self, request, sender) -> None:
        values = io.inputs(request)
        req = parse_request(values, self.engine.limits)
        req.deadline = io.deadline(request)
        whole_chars = req.stream and scalar(values, "stream_whole_chars", bool, False, strict=False)
        if whole_chars and self.codec is None:
            raise invalid(f"stream_whole_chars needs a tokenizer; base model folder {self.base_model} has none")
        respond = Responder(
            sender,
            req,
            outputs=set(request.requested_output_names()),
            codec=self.codec if whole_chars else None,
            outbox=self.outbox,
            cancels=self.cancels,
            stop_key=io.stop_key(request),
            stops=self.stops,
            metrics=self.engine.metrics,
        )
        try:
            self.engine.submit(req, respond)
        except BaseException:
            self.cancels.forget(req.id)
            raise

    def finalize(self):
        self.watch.close()
        self.engine.shutdown()
        self.outbox.close()
        self.cancels.close()


class Responder:
    """One request's outputs, handed to the outbox by the engine thread. Streamed tokens go out one
    response each as they come, or together when sends fall behind; with stream_whole_chars (the
    ensemble's text streams) in groups that decode to whole characters. A front door's request
    (it carries a stop key) is cancelled by its stop file too, and gets errors as a finish_reason."""

    def __init__(self, sender, req: GenerationRequest, *, outputs, codec, outbox, cancels, stop_key, stops, metrics):
        self.sender, self.id, self.outputs = sender, req.id, outputs
        self.prefix = req.input_ids if req.echo_prompt else []
        self.chunker = StreamChunker(codec) if codec else None
        self.outbox, self.cancels, self.metrics = outbox, cancels, metrics
        self.in_band_errors = stop_key is not None
        self.closed = False  # the final response went out, or a send failed and ended the request
        stopped = (lambda: stops.stopped(stop_key)) if stop_key else None
        watched = cancels.watch(req.id, sender, also=stopped)
        req.is_cancelled = lambda: self.closed or watched()

    def __call__(self, out: Output) -> None:
        self.outbox.put(self, out)

    def send(self, outs: list[Output]) -> None:
        """Outputs handed over since the last send, as one response. A send that fails ends the
        request: the engine sees it as cancelled, and the client gets an error if it can still be sent."""
        if self.closed:
            return
        try:
            self._send(outs)
        except Exception as e:
            self.closed = True
            self.cancels.forget(self.id)
            self._send_error(internal(f"sending a response failed: {e}"))
            raise

    def _send(self, outs: list[Output]) -> None:
        out = outs[-1]
        if out.error is not None or out.finish_reason:
            self.closed = True
            self.cancels.forget(self.id)  # before the final response: Triton then frees the sender
            self.metrics.flush()  # a client that has its answer sees it counted
        if out.error is not None:
            self._send_error(out.error)
            return
        ids = self.prefix + [t for o in outs for t in o.token_ids]
        log_probs = [p for o in outs for p in o.log_probs]
        self.prefix = []
        if self.chunker:
            chunk = self.chunker.add(ids, log_probs, final=out.finish_reason is not None)
            if chunk is None:
                return
            ids, log_probs = chunk
        response = self._response(ids, log_probs, out.finish_reason, out.adapter_version, out.step)
        self.sender.send(response, flags=io.FINAL if out.finish_reason else 0)

    def _send_error(self, err: RequestError) -> None:
        if self.in_band_errors:  # a front door's stream: see io.in_band_error
            self.sender.send(self._response([], [], io.in_band_error(err)), flags=io.FINAL)
        else:
            self.sender.send(io.error_response(err), flags=io.FINAL)

    def _response(self, ids, log_probs, finish_reason: str | None, version: str = "", step: int = 0):
        values = {
            "output_ids": (ids, np.int64),
            "output_log_probs": (log_probs, np.float32),
            "finish_reason": ([finish_reason or ""], np.object_),
            "adapter_version": ([version], np.object_),
            "engine_step": ([step], np.int64),
        }
        return pb_utils.InferenceResponse(
            output_tensors=[io.tensor(name, *v) for name, v in values.items() if name in self.outputs]
        )
