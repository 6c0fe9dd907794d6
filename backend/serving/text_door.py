"""The text front doors, `lora_text` (unary) and `ensemble` (streams): each request is tokenized,
sent to lora_llm through BLS and detokenized on a worker thread of its own, so a short request never
waits behind a long one. They hold no weights: one copy of the model lives in lora_llm.

`ensemble` is a Python model, not Triton's ensemble platform: on Triton 2.51 a cancelled ensemble
request never stops its running lora_llm step, and a stopping server refuses the postprocessing
steps of the streams in flight, which then never end (core fixed the stuck requests in r26.02). A
Python front door sees its own client go and stops lora_llm through a stop file (StopFiles)."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from backend.config import EngineConfig
from backend.errors import RequestError, code_of, invalid, unavailable
from backend.serving import triton_io as io
from backend.serving.request_tensors import scalar
from backend.serving.text import StopStrings, TextCodec, check_stop_strings

FORWARDED = [
    *("lora_name", "max_tokens", "temperature", "top_p", "top_k", "seed", "end_id", "exclude_input_in_output"),
    *("min_length", "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos"),
]
OUTPUTS = ["output_ids", "finish_reason", "adapter_version"]  # asked of lora_llm
MAX_WORKERS = 512  # requests answered at once; past it they queue here (the engine has its own bound)


class TextDoor:
    streams = False  # whether `stream=true` is served (a decoupled model)

    def initialize(self, args):
        cfg = EngineConfig.from_parameters(io.parameters(args))
        io.log_settings(
            args["model_name"], {"base_model": str(cfg.base_model), "max_model_len": str(cfg.max_model_len)}
        )
        self.codec = TextCodec(cfg.base_model, cfg.max_model_len)
        self.stops = io.StopFiles()
        self.cancels = io.CancelWatch()
        self.pool = ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="lora-text")
        self.engine_gone = False
        self.spent = io.SpentIterators()
        self.watch = io.ServerWatch(lambda: None, alive=self.engine_alive, dead="lora_llm's stub process died")

    def engine_alive(self) -> bool:
        self.engine_gone = self.stops.process_alive("lora_llm") is False
        return not self.engine_gone

    def execute(self, requests):
        for request in requests:
            values = {k: v.copy() for k, v in io.inputs(request).items()}  # Triton frees the inputs on return
            self.pool.submit(self.answer, request.get_response_sender(), values, request.timeout())
        return None

    def answer(self, sender, values: dict, timeout_us: int) -> None:
        key = self.stops.new_key()
        self.cancels.watch(key, sender, on_cancel=lambda: self.stops.stop(key))
        try:
            final = io.guarded(self.generate, sender, values, key, timeout_us)
        finally:
            self.cancels.forget(key)  # before the final response: Triton then frees the sender
            self.stops.clear(key)
        try:
            sender.send(final, flags=io.FINAL)
        except Exception:
            io.log.exception("sending a response failed")

    def generate(self, sender, values: dict, key: str, timeout_us: int):
        """Sends the streamed responses and returns the final one."""
        if self.engine_gone:
            raise unavailable("lora_llm's stub process died: the server is stopping")
        stream = scalar(values, "stream", bool, False, strict=False)
        if stream and not self.streams:
            raise invalid("lora_text answers once; stream with the 'ensemble' model")
        ids = self.codec.encode_prompt(scalar(values, "text_input", str, "", strict=False))
        stops = stop_strings(values)
        echo = (
            stops is not None and not stream and not scalar(values, "exclude_input_in_output", bool, True, strict=False)
        )
        tensors = [io.tensor("input_ids", ids, np.int64)]
        tensors += [pb_utils.Tensor(name, values[name]) for name in FORWARDED if name in values]
        if stream or stops is not None:  # stop strings are looked for as the text comes
            tensors = [t for t in tensors if t.name() != "exclude_input_in_output"]
            tensors += [io.tensor(name, [True], np.bool_) for name in ("stream", "stream_whole_chars")]
        call = pb_utils.InferenceRequest(
            model_name="lora_llm",
            inputs=tensors,
            requested_output_names=OUTPUTS,
            parameters={io.StopFiles.PARAMETER: key},
            timeout=timeout_us,
        )
        responses = call.exec(decoupled=True)
        try:
            final = self.read(responses, sender, stream, stops)
            if stops is not None and final[1] == "stop":  # cut short: the rest is not wanted
                self.stops.stop(key)
                for _ in responses:
                    pass
            return text_response(self.codec.decode(ids) + final[0] if echo else final[0], *final[1:])
        except RequestError:  # lora_llm's error: always its final response, the stream has ended
            raise
        except BaseException:  # left mid-stream: lora_llm ends the request, its last responses are read here
            self.stops.stop(key)
            for _ in responses:
                pass
            raise
        finally:
            self.spent.keep(responses)

    def read(self, responses, sender, stream: bool, stops: StopStrings | None) -> tuple[str, str, str]:
        """(text, finish_reason, adapter_version) of the final response; streamed ones are sent here."""
        pieces, finish, version = [], "", ""
        for response in responses:
            if response.has_error():
                message = response.error().message()
                raise RequestError(code_of(message), message)
            if not response.output_tensors():
                continue
            out = {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in OUTPUTS}
            ids = out["output_ids"].reshape(-1).tolist()
            finish = scalar(out, "finish_reason", strict=False)
            if error := io.error_in(finish):
                raise error
            version = scalar(out, "adapter_version", strict=False)
            text, hit = self.codec.decode(ids), False
            if stops is not None:
                text, hit = stops.add(text, final=bool(finish))
                finish = "stop" if hit else finish
            if stream and not finish:
                if text:
                    sender.send(text_response(text, "", version))
            else:
                pieces.append(text)
            if hit:
                break
        return "".join(pieces), finish, version

    def finalize(self):
        self.watch.close()
        self.pool.shutdown(wait=False, cancel_futures=True)  # a worker stuck on a gone client must not hold the unload
        self.cancels.close()
        self.spent.clear()


def text_response(text: str, finish: str, version: str):
    values = {"text_output": text, "finish_reason": finish, "adapter_version": version}
    return pb_utils.InferenceResponse([io.tensor(name, [v], np.object_) for name, v in values.items()])


def stop_strings(values: dict) -> StopStrings | None:
    array = values.get("stop_words")
    if array is None or array.size == 0:
        return None
    try:
        words = [w.decode("utf-8") if isinstance(w, bytes) else str(w) for w in array.reshape(-1)]
    except UnicodeDecodeError as e:
        raise invalid("stop_words is not valid UTF-8") from e
    return StopStrings(check_stop_strings(words))
