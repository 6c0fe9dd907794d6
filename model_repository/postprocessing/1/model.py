"""output_ids -> text_output (special tokens left out)."""

import numpy as np
import triton_python_backend_utils as pb_utils

from backend import triton_io as io
from backend.config import EngineConfig
from backend.text import TextCodec


class TritonPythonModel:
    def initialize(self, args):
        self.codec = TextCodec(EngineConfig.from_parameters(io.parameters(args)).base_model)

    def execute(self, requests):
        return [pb_utils.InferenceResponse([io.tensor("text_output", [self.decode(r)], np.object_)]) for r in requests]

    def decode(self, request) -> str:
        return self.codec.decode(pb_utils.get_input_tensor_by_name(request, "output_ids").as_numpy().reshape(-1))
