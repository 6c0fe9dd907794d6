"""Unary text front door (tritonclient HTTP / gRPC `infer`): tokenizes, calls lora_llm through BLS,
detokenizes. Holds no weights: one copy of the model lives in lora_llm."""

import asyncio

import numpy as np
import triton_python_backend_utils as pb_utils

from backend import triton_io as io
from backend.config import EngineConfig
from backend.errors import RequestError, code_of, invalid
from backend.text import TextCodec

FORWARDED = ["lora_name", "max_tokens", "temperature", "top_p", "top_k", "seed", "end_id", "exclude_input_in_output"]


class TritonPythonModel:
    def initialize(self, args):
        self.codec = TextCodec(EngineConfig.from_parameters(io.parameters(args)).base_model)

    async def execute(self, requests):
        return list(await asyncio.gather(*(self.generate(r) for r in requests)))

    async def generate(self, request):
        values = io.inputs(request)
        if io.scalar(values, "stream", False):
            return io.error_response(invalid("lora_text answers once; stream with the 'ensemble' model"))
        tensors = [io.tensor("input_ids", self.codec.encode(io.scalar(values, "text_input", "")), np.int64)]
        tensors += [pb_utils.Tensor(name, values[name]) for name in FORWARDED if name in values]
        call = pb_utils.InferenceRequest(
            model_name="lora_llm", inputs=tensors, requested_output_names=["output_ids", "finish_reason"]
        )
        ids, finish = [], ""
        for response in await call.async_exec(decoupled=True):
            if response.has_error():
                message = response.error().message()
                return io.error_response(RequestError(code_of(message), message))
            if response.output_tensors():
                ids += pb_utils.get_output_tensor_by_name(response, "output_ids").as_numpy().reshape(-1).tolist()
                finish = io.first(pb_utils.get_output_tensor_by_name(response, "finish_reason").as_numpy())
        return pb_utils.InferenceResponse(
            [
                io.tensor("text_output", [self.codec.decode(ids)], np.object_),
                io.tensor("finish_reason", [finish], np.object_),
            ]
        )
