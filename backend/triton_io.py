"""Glue between Triton's Python backend objects and ours; imported only by the model.py files."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from backend.errors import RequestError

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# pb_utils.TritonError, InferenceResponse, Tensor are put into the module by the stub after import:
# look them up at call time only.


def parameters(args: dict) -> dict[str, str]:
    """config.pbtxt `parameters` of the model being initialized, as name -> string."""
    config = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def inputs(request) -> dict[str, np.ndarray]:
    return {t.name(): t.as_numpy() for t in request.inputs()}


def tensor(name: str, values, dtype):
    """One request's output with its batch dimension: [1, n]."""
    return pb_utils.Tensor(name, np.asarray(values, dtype=dtype).reshape(1, -1))


def error_response(err: RequestError):
    """err.code is the name of a pb_utils.TritonError code (INVALID_ARG, NOT_FOUND, ...)."""
    code = getattr(pb_utils.TritonError, err.code, pb_utils.TritonError.INTERNAL)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(err.message, code))


def first(array: np.ndarray | None, default=None):
    """The single value of a [1] / [1, 1] tensor as a Python object (bytes decoded); default if absent."""
    if array is None or array.size == 0:
        return default
    item = array.reshape(-1)[0]
    return item.decode("utf-8") if isinstance(item, bytes) else item.item() if hasattr(item, "item") else item


def scalar(values: dict[str, np.ndarray], name: str, default=None):
    return first(values.get(name), default)
