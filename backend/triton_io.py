"""Glue between Triton's Python backend objects and ours; imported only by the model.py files."""

import json
import logging
import queue
import threading
from collections.abc import Callable

import numpy as np
import triton_python_backend_utils as pb_utils

from backend.errors import RequestError

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
log = logging.getLogger("lora_engine")
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


class Outbox:
    """Sends responses on a thread of its own: a send is a round trip to the server process (about
    0.7 ms on 2 cores), and the engine thread goes on with the next step meanwhile. What is handed
    over while sends are behind is grouped per responder: `send(items)` gets all of them, in order."""

    def __init__(self):
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="lora-responses", daemon=True)
        self.thread.start()

    def put(self, responder, item) -> None:
        """responder.send([item, ...]) will be called on the outbox thread."""
        self.queue.put((responder, item))

    def close(self, timeout: float = 30.0) -> None:
        """Sends what was handed over, then stops."""
        self.queue.put(None)
        self.thread.join(timeout)

    def _run(self) -> None:
        while True:
            batch = [self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            grouped: dict[object, list] = {}
            for entry in batch:
                if entry is not None:
                    grouped.setdefault(entry[0], []).append(entry[1])
            for responder, items in grouped.items():
                try:
                    responder.send(items)
                except Exception:  # one response that cannot be sent must not stop the others
                    log.exception("sending a response failed")
            if None in batch:
                return


class CancelWatch:
    """Tells which requests their clients cancelled. Asking Triton is a round trip to the server
    process (about 0.4 ms): a thread of its own asks for every watched request every `period` seconds,
    and the engine reads a flag. A request must be forgotten before its final response is sent: Triton
    frees what is_cancelled reads with it."""

    def __init__(self, period: float = 0.1):
        self.period = period
        self.watched: dict[int, _Watched] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lora-cancel-watch", daemon=True)
        self.thread.start()

    def watch(self, key: int, sender) -> Callable[[], bool]:
        entry = _Watched(sender)
        with self.lock:
            self.watched[key] = entry
        return entry.cancelled.is_set

    def forget(self, key: int) -> None:
        with self.lock:
            entry = self.watched.pop(key, None)
        if entry is not None:
            with entry.lock:  # waits for a poll in progress
                entry.sender = None

    def close(self) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stop.wait(self.period):
            with self.lock:
                entries = list(self.watched.values())
            for entry in entries:
                with entry.lock:
                    if entry.sender is not None and entry.sender.is_cancelled():
                        entry.cancelled.set()


class _Watched:
    def __init__(self, sender):
        self.sender = sender
        self.cancelled = threading.Event()
        self.lock = threading.Lock()
