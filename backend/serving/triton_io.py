"""Glue between Triton's Python backend objects and ours; imported only by the model.py files."""

import collections
import contextlib
import itertools
import json
import logging
import os
import queue
import signal
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable

import numpy as np
import psutil
import triton_python_backend_utils as pb_utils

from backend.errors import RequestError, internal

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
log = logging.getLogger("lora_engine")
# pb_utils.TritonError, InferenceResponse, Tensor are put into the module by the stub after import:
# look them up at call time only.


def parameters(args: dict) -> dict[str, str]:
    """config.pbtxt `parameters` of the model being initialized, as name -> string."""
    config = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def log_settings(model: str, settings: dict[str, str], *more: str) -> None:
    """One line in the server's log with the settings in effect (and what loading found)."""
    line = " ".join(f"{k}={v}" for k, v in settings.items())
    pb_utils.Logger.log_info(f"{model} settings: {line}" + "".join(f"; {m}" for m in more))


def inputs(request) -> dict[str, np.ndarray]:
    return {t.name(): t.as_numpy() for t in request.inputs()}


def tensor(name: str, values, dtype):
    """One request's output with its batch dimension: [1, n]."""
    return pb_utils.Tensor(name, np.asarray(values, dtype=dtype).reshape(1, -1))


def error_response(err: RequestError):
    """err.code is the name of a pb_utils.TritonError code (INVALID_ARG, NOT_FOUND, ...)."""
    code = getattr(pb_utils.TritonError, err.code, pb_utils.TritonError.INTERNAL)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(err.message, code))


def guarded(fn, *args):
    """fn(*args), or the error response for what it raised: what one request causes is its own error."""
    try:
        return fn(*args)
    except RequestError as e:
        return error_response(e)
    except Exception as e:
        log.exception("a request failed")
        return error_response(internal(f"{type(e).__name__}: {e}"))


def deadline(request) -> float | None:
    """The time.monotonic() at which the request's Triton timeout (microseconds; 0 = none) runs out."""
    timeout_us = request.timeout()
    return time.monotonic() + timeout_us / 1e6 if timeout_us else None


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


class SpentIterators:
    """Holds each finished BLS response iterator for `seconds` more. python_backend frees an iterator,
    and the numpy arrays of its responses, wherever its last reference goes: when that is the stub's
    own table of iterators (ResponseIterator cleanup, Stub::SendCleanupId), on a thread without the
    GIL, which corrupts the Python heap; concurrent streams crashed the ensemble's stub in pymalloc
    within seconds. Held a while longer, an iterator is let go by that table first, then here."""

    def __init__(self, seconds: float = 10.0):
        self.seconds = seconds
        self.held: collections.deque = collections.deque()
        self.lock = threading.Lock()

    def keep(self, iterator) -> None:
        now = time.monotonic()
        with self.lock:
            self.held.append((now + self.seconds, iterator))
            while self.held[0][0] < now:
                self.held.popleft()

    def clear(self) -> None:
        """Before the stub goes down: iterators freed after its shared memory crash the process."""
        with self.lock:
            self.held.clear()


class StopFiles:
    """'Stop this request' flags between stub processes, as empty files in one folder per
    tritonserver process (the stubs' parent). Triton 2.51 can neither cancel a BLS request nor tell a
    running ensemble step that its client left: a front door that sees its own request cancelled
    touches the key it gave lora_llm, and lora_llm's CancelWatch sees the file."""

    PARAMETER = "lora_stop_key"  # the BLS request parameter that carries the key

    def __init__(self, root: str | None = None):
        self.dir = os.path.join(root or tempfile.gettempdir(), f"lora-stop-{os.getppid()}")
        os.makedirs(self.dir, exist_ok=True)
        self._keys = itertools.count()
        self.server_started = psutil.Process(os.getppid()).create_time()

    def new_key(self) -> str:
        return f"{os.getpid()}-{next(self._keys)}"

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def stop(self, key: str) -> None:
        open(self._path(key), "w").close()

    def stopped(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def clear(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._path(key))

    def publish_pid(self, name: str) -> None:
        with open(self._path(f"{name}.pid"), "w") as f:
            f.write(str(os.getpid()))

    def process_alive(self, name: str) -> bool | None:
        """Whether the process that published `name` runs (a zombie does not); None if none published."""
        try:
            if os.path.getmtime(self._path(f"{name}.pid")) < self.server_started - 1:
                return None  # left by an earlier server that had this pid
            with open(self._path(f"{name}.pid")) as f:
                pid = int(f.read())
        except (FileNotFoundError, ValueError):
            return None
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except FileNotFoundError:
            return False


IN_BAND_ERROR = "error:"  # finish_reason prefix of an error lora_llm hands a front door as an output


def in_band_error(err: RequestError) -> str:
    """An error as the finish_reason of a front door's BLS stream. python_backend before r25.04 drops
    the id of an error response to a decoupled BLS caller (InferResponse::SaveToSharedMemory), so an
    error after the first response never reaches the caller's iterator, which then waits forever."""
    return f"{IN_BAND_ERROR}{err.code}:{err.message}"


def error_in(finish_reason: str) -> RequestError | None:
    if not finish_reason.startswith(IN_BAND_ERROR):
        return None
    code, _, message = finish_reason[len(IN_BAND_ERROR) :].partition(":")
    return RequestError(code, message)


def stop_key(request) -> str | None:
    """The stop key a front door put into its BLS request's parameters, if any."""
    return json.loads(request.parameters() or "{}").get(StopFiles.PARAMETER)


class CancelWatch:
    """Tells which requests their clients cancelled. Asking Triton is a round trip to the server
    process (about 0.4 ms): a thread of its own asks for every watched request every `period` seconds,
    and the engine reads a flag. A request must be forgotten before its final response is sent: Triton
    frees what is_cancelled reads with it. `also` is checked beside Triton's flag (a stop file);
    `on_cancel` is called once, on the watch thread, when a request is found cancelled."""

    def __init__(self, period: float = 0.1):
        self.period = period
        self.watched: dict[object, _Watched] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lora-cancel-watch", daemon=True)
        self.thread.start()

    def watch(self, key, sender, also: Callable[[], bool] | None = None, on_cancel=None) -> Callable[[], bool]:
        entry = _Watched(sender, also, on_cancel)
        with self.lock:
            self.watched[key] = entry
        return entry.cancelled.is_set

    def forget(self, key) -> None:
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
                    if entry.sender is None or entry.cancelled.is_set():
                        continue
                    try:
                        cancelled = (entry.also is not None and entry.also()) or entry.sender.is_cancelled()
                    except Exception:  # asking must not stop the watch
                        log.exception("checking a request for cancellation failed")
                        continue
                    if cancelled:
                        entry.cancelled.set()
                        if entry.on_cancel is not None:
                            entry.on_cancel()


class _Watched:
    def __init__(self, sender, also, on_cancel):
        self.sender = sender
        self.also = also
        self.on_cancel = on_cancel
        self.cancelled = threading.Event()
        self.lock = threading.Lock()


def stop_server(reason: str) -> None:
    """Asks tritonserver (the stub's parent) to shut down, so that its health says it cannot serve and
    whatever supervises it restarts it: Triton 2.51 has no way for a model to report itself unready."""
    log.error("%s: stopping tritonserver so that it can be restarted", reason)
    os.kill(os.getppid(), signal.SIGTERM)


class ServerWatch:
    """Calls `on_stopping` once tritonserver has begun to shut down, and asks it to stop if `alive`
    turns false. Triton 2.51 tells a Python model nothing until every request in flight has ended, and
    asking it from a thread whether a model is ready can crash it: a thread asks the server's HTTP
    health endpoint instead (`/v2/health/live` fails from the moment it stops), every `period` s."""

    def __init__(self, on_stopping, alive, dead: str = "the engine thread stopped", period: float = 0.5):
        self.on_stopping, self.alive, self.dead, self.period = on_stopping, alive, dead, period
        self.url = health_url(os.getppid())
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lora-server-watch", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        misses, seen_live = 0, False
        while not self.stop.wait(self.period):
            if not self.alive():
                stop_server(self.dead)
                return
            if self.url is None:
                continue
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    live = r.status == 200
            except OSError:
                live = False
            seen_live = seen_live or live  # the endpoint starts only once every model has loaded
            misses = 0 if live or not seen_live else misses + 1
            if misses == 2:  # twice in a row: a stopping server never becomes live again
                log.warning("the server is shutting down: requests in flight get a short grace period")
                self.on_stopping()
                return


def health_url(server_pid: int) -> str | None:
    """The liveness URL of the tritonserver with this pid, from its command line; None without HTTP."""
    try:
        with open(f"/proc/{server_pid}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    options = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            options[name] = value if _ else (args[i + 1] if i + 1 < len(args) else "")
    if options.get("allow-http", "true").lower() in ("false", "0"):
        return None
    return f"http://127.0.0.1:{options.get('http-port', '8000')}/v2/health/live"
