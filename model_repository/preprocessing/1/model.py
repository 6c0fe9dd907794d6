"""text_input -> input_ids with the base model's tokenizer."""

import numpy as np
import triton_python_backend_utils as pb_utils

from backend import triton_io as io
from backend.config import EngineConfig
from backend.text import TextCodec


class TritonPythonModel:
    def initialize(self, args):
        self.codec = TextCodec(EngineConfig.from_parameters(io.parameters(args)).base_model)

    def execute(self, requests):
        return [
            pb_utils.InferenceResponse([io.tensor("input_ids", self.codec.encode(text_of(r)), np.int64)])
            for r in requests
        ]


def text_of(request) -> str:
    return io.scalar(io.inputs(request), "text_input", "")
