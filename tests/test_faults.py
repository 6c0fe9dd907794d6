"""One tenant cannot hurt another, through the real tritonserver: poisoned requests fail alone,
clients that leave stop their generation on every front door, adapter files that change or escape
are refused cleanly, and a dead engine is not reported healthy."""

import http.client
import json
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import openai
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from backend.config import ENV_ADAPTER_DIR, ENV_BASE_MODEL
from backend.lora.adapters import WEIGHTS_FILE
from client.api import generate, infer, make_inputs
from client.server import OpenAIServer, TritonServer, copy_repository
from demo.builders import DEMO_ADAPTERS, build_adapter, build_model

LONG = 3000  # tokens a long request asks for: seconds of generation


@pytest.fixture(scope="module")
def fault_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    build_model(root / "base", vocab_size=512, max_position_embeddings=4096)
    for i, name in enumerate(["qv-r4", "mlp-r64"]):
        build_adapter(root / "base", root / "adapters" / name, seed=i + 1, **DEMO_ADAPTERS[name])
    return root


def start_server(assets, tmp_path, **parameters) -> TritonServer:
    repo = copy_repository(tmp_path / "repo", max_tokens_limit=str(LONG), **parameters)
    env = {ENV_BASE_MODEL: str(assets / "base"), ENV_ADAPTER_DIR: str(assets / "adapters")}
    return TritonServer(repository=repo, env=env, log_path=tmp_path / "tritonserver.log").start()


@pytest.fixture(scope="module")
def fserver(fault_assets, tmp_path_factory):
    """The module's server. After every test here (cancelled and abandoned requests included) it is
    idle, and a SIGTERM stops it in seconds with exit code 0."""
    server = start_server(fault_assets, tmp_path_factory.mktemp("fault-server"))
    try:
        yield server
    finally:
        start = time.monotonic()
        code = server.stop()
        took = time.monotonic() - start
    assert code == 0 and took < 10, f"tritonserver did not stop cleanly ({code}, {took:.0f} s):\n{server.log_tail()}"


GOOD = [(name, [1, 10 + i, 20 + i, 30 + i]) for i, name in enumerate(["qv-r4", "", "mlp-r64", "qv-r4", "", "mlp-r64"])]


def good_call(server, name, ids):
    return generate(server.grpc_url, "lora_llm", input_ids=ids, lora_name=name or None, max_tokens=24, end_id=-1)


POISON = {
    "tiny temperature": lambda s: generate(
        s.grpc_url, "lora_llm", input_ids=[1, 5, 6], temperature=1e-40, max_tokens=24
    ),
    "invalid UTF-8 lora_name": lambda s: generate(s.grpc_url, "lora_llm", input_ids=[1, 5], lora_name=b"\xff\xfe"),
    "invalid UTF-8 to lora_text": lambda s: infer(s.http_url, "http", "lora_text", text_input=b"ok \xff\xfe"),
    "invalid UTF-8 to the ensemble": lambda s: generate(s.grpc_url, "ensemble", text_input=b"\xc3\x28", stream=True),
    "2 MB of text": lambda s: infer(s.grpc_url, "grpc", "lora_text", text_input="ab " * 700_000),
}


def beside_good(server, call):
    """call(server) sent with 6 good requests at once, which must get exactly the outputs they get
    alone; (its result, None) or (None, the error it raised)."""
    alone = [good_call(server, *g).token_ids for g in GOOD]
    with ThreadPoolExecutor(len(GOOD) + 1) as pool:
        poisoned = pool.submit(call, server)
        together = [pool.submit(good_call, server, *g) for g in GOOD]
        outputs = [f.result().token_ids for f in together]
        try:
            result, error = poisoned.result(), None
        except InferenceServerException as e:
            result, error = None, e
    assert outputs == alone
    return result, error


@pytest.mark.parametrize("case", POISON)
def test_poison_fails_alone(fserver, case):
    """Each poisoning request, sent with 6 good ones at once: the good ones get exactly the outputs
    they get alone; the poisoned one gets its own error (or, for a tiny temperature, an answer)."""
    result, error = beside_good(fserver, POISON[case])
    if case == "tiny temperature":
        assert error is None and len(result.token_ids) == 24  # raised to the floor: all but greedy
    else:
        assert error is not None
        assert any(s in error.message() for s in ("not valid UTF-8", "cannot fit the context")), error
        assert str(error.status()) in ("400", "StatusCode.INVALID_ARGUMENT", "None"), error


BAD_CONTROLS = {  # the generation controls' bad values, on each door: (call, what the error says)
    "repetition_penalty 0": (
        lambda s: generate(s.grpc_url, "lora_llm", input_ids=[1, 5, 6], repetition_penalty=0.0),
        "repetition_penalty must be > 0",
    ),
    "min_length above max_tokens": (
        lambda s: generate(s.grpc_url, "lora_llm", input_ids=[1, 5, 6], max_tokens=4, min_length=5),
        "min_length must be in [0, max_tokens=4]",
    ),
    "presence_penalty 3 to lora_text": (
        lambda s: infer(s.http_url, "http", "lora_text", text_input="Beautiful is", presence_penalty=3.0),
        "presence_penalty must be in [-2, 2]",
    ),
    "5 stop words to the ensemble": (
        lambda s: generate(s.grpc_url, "ensemble", text_input="Beautiful is", stream=True, stop_words=list("abcde")),
        "at most 4 stop strings",
    ),
}


@pytest.mark.parametrize("case", BAD_CONTROLS)
def test_bad_generation_controls_fail_alone(fserver, case):
    call, message = BAD_CONTROLS[case]
    _, error = beside_good(fserver, call)
    assert error is not None and message in error.message(), error


def generated(server) -> float:
    return server.metric("lora_generated_tokens_total")


def wait_generated(server, before: float, timeout: float = 60.0) -> float:
    """Tokens generated by the next request to finish (the counter moves when one does)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = generated(server)
        if now != before:
            return now - before
        time.sleep(0.2)
    raise AssertionError("no request finished")


def leave_grpc_stream(model, **values):
    def leave(server):
        client = grpcclient.InferenceServerClient(server.grpc_url)
        client.start_stream(callback=lambda result, error: None)
        inputs = make_inputs(grpcclient, max_tokens=LONG, end_id=-1, stream=True, **values)
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        time.sleep(0.5)
        client.stop_stream(cancel_requests=True)

    return leave


def leave_http_stream(model, **values):
    """Closes the connection of an HTTP generate_stream call once its first event has come."""

    def leave(server):
        conn = http.client.HTTPConnection("localhost", server.http_port)
        body = json.dumps({"max_tokens": LONG, "end_id": -1, "stream": True, **values})
        conn.request("POST", f"/v2/models/{model}/generate_stream", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.fp.readline()
        time.sleep(0.5)
        conn.sock.close()
        conn.close()

    return leave


def cancel_lora_text(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    values = dict(text_input="Beautiful is", max_tokens=LONG, end_id=-1)
    call = client.async_infer("lora_text", make_inputs(grpcclient, **values), callback=lambda result, error: None)
    time.sleep(0.5)
    call.cancel()


LEAVE = {
    "ensemble gRPC cancel": leave_grpc_stream("ensemble", text_input="Beautiful is"),
    "ensemble HTTP disconnect": leave_http_stream("ensemble", text_input="Beautiful is"),
    "lora_text gRPC cancel": cancel_lora_text,
    "lora_llm gRPC cancel": leave_grpc_stream("lora_llm", input_ids=[1, 5, 6]),
    "lora_llm HTTP disconnect": leave_http_stream("lora_llm", input_ids=[1, 5, 6]),
}


@pytest.mark.parametrize("case", LEAVE)
def test_client_that_leaves_stops_its_generation(fserver, case):
    """On every front door, a client that cancels or disconnects stops its generation within a few
    steps, and nothing stays in flight: the module's server still stops cleanly afterwards."""
    before = generated(fserver)
    LEAVE[case](fserver)
    assert wait_generated(fserver, before) < LONG / 2  # stopped, not run to the end
    assert fserver.metric("lora_engine_running_sequences") == 0
    assert fserver.metric("nv_inference_pending_request_count") == 0


@pytest.fixture(scope="module")
def fopenai(fserver, fault_assets, tmp_path_factory):
    log = tmp_path_factory.mktemp("fault-openai") / "openai.log"
    with OpenAIServer(fserver.grpc_url, fault_assets / "base", fault_assets / "adapters", log_path=log) as front:
        yield front


def leave_openai_stream(front):
    """The openai SDK closes a streamed completion once its first chunks have come."""
    client = openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0)
    values = dict(model="qv-r4", prompt="Beautiful is", max_tokens=LONG, extra_body={"ignore_eos": True})
    with client.completions.create(stream=True, **values) as chunks:
        for _, _ in zip(range(3), chunks):
            pass
        time.sleep(0.5)


def leave_openai_unary(front):
    """Closes the connection of a unary completion that is still being generated."""
    conn = http.client.HTTPConnection("localhost", front.port)
    body = json.dumps({"model": "base", "prompt": "Beautiful is", "max_tokens": LONG, "ignore_eos": True})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    time.sleep(0.8)
    conn.sock.close()
    conn.close()


@pytest.mark.parametrize("leave", [leave_openai_stream, leave_openai_unary], ids=["stream", "unary"])
def test_client_that_leaves_the_openai_server_stops_its_generation(fserver, fopenai, leave):
    before = generated(fserver)
    leave(fopenai)
    assert wait_generated(fserver, before) < LONG / 2  # stopped, not run to the end
    assert fserver.metric("lora_engine_running_sequences") == 0
    assert fserver.metric("nv_inference_pending_request_count") == 0


def test_sigterm_under_load_ends_every_stream(fault_assets, tmp_path):
    """SIGTERM while streams run on every front door: each ends with its final response or a clear
    UNAVAILABLE error after the grace period, and tritonserver exits 0 well within its exit timeout."""
    server = start_server(fault_assets, tmp_path)
    values = dict(max_tokens=LONG, end_id=-1)
    calls = [partial(generate, server.grpc_url, "ensemble", text_input="Beautiful is", stream=True, **values)] * 2
    calls += [partial(generate, server.grpc_url, "lora_llm", input_ids=[1, 5, 6], stream=True, **values)] * 2
    calls += [partial(infer, server.http_url, "http", "lora_text", text_input="Beautiful is", **values)] * 2
    try:
        with ThreadPoolExecutor(len(calls)) as pool:
            running = [pool.submit(call) for call in calls]
            time.sleep(1.0)
            start = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            code = server.process.wait(30)
            took = time.monotonic() - start
            ends = []
            for future in running:
                try:
                    ends.append(future.result(timeout=5).finish_reason)
                except InferenceServerException as e:
                    ends.append(e.message())
    finally:
        server.stop()
    assert code == 0 and took < 20, (code, took)
    assert all(end in ("length", "the model is shutting down") for end in ends), ends


def test_short_request_is_not_held_behind_a_long_one(fserver):
    values = dict(text_input="Beautiful is", end_id=-1)
    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(infer, fserver.http_url, "http", "lora_text", max_tokens=LONG, **values)
        time.sleep(0.2)
        start = time.monotonic()
        short = pool.submit(infer, fserver.http_url, "http", "lora_text", max_tokens=1, **values).result()
        took = time.monotonic() - start
        assert not long.done()
        long.result()
    assert short.finish_reason == "length" and took < 2.0


def test_adapter_file_changed_in_place(fserver, fault_assets):
    """An adapter overwritten in place, then shrunk in place, after it was loaded: the folder is the
    source of truth, so new requests get the damaged file's error, never weights from a half-written
    file. A copy damaged the same way before its first load is refused too, and the server goes on."""
    adapters = fault_assets / "adapters"
    shutil.copytree(adapters / "qv-r4", adapters / "mutable")
    shutil.copytree(adapters / "qv-r4", adapters / "damaged")
    expected = good_call(fserver, "qv-r4", [1, 7, 8]).token_ids
    assert good_call(fserver, "mutable", [1, 7, 8]).token_ids == expected
    for name in ["mutable", "damaged"]:
        path = adapters / name / WEIGHTS_FILE
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.write(b"\0" * size)
            f.truncate(size // 3)
    for name in ["mutable", "damaged"]:
        with pytest.raises(InferenceServerException, match=f"LoRA adapter '{name}': cannot read"):
            good_call(fserver, name, [1, 7, 8])
    assert good_call(fserver, "qv-r4", [1, 7, 8]).token_ids == expected


def test_symlink_out_of_the_adapter_folder_is_refused(fserver, fault_assets, tmp_path):
    shutil.copytree(fault_assets / "adapters" / "qv-r4", tmp_path / "outside")
    os.symlink(tmp_path / "outside", fault_assets / "adapters" / "escape")
    with pytest.raises(InferenceServerException, match="link out of the adapter's folder"):
        good_call(fserver, "escape", [1, 7, 8])
    for protocol, code in [("http", "400"), ("grpc", "StatusCode.INVALID_ARGUMENT")]:
        url = fserver.http_url if protocol == "http" else fserver.grpc_url
        with pytest.raises(InferenceServerException) as e:
            infer(url, protocol, "lora_text", text_input="hi", lora_name="escape")
        assert str(e.value.status()) == code


def test_health_after_the_engine_stub_dies(fault_assets, tmp_path):
    """Kill lora_llm's stub: the front doors answer UNAVAILABLE at once and the server stops, so its
    health endpoints stop answering ready (Triton 2.51 gives a model no way to report itself unready)."""
    server = start_server(fault_assets, tmp_path)
    try:
        server.processes()["lora_llm_0_0"].send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 20
        while server.ready() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not server.ready()
        assert server.process.wait(60) is not None
        assert "lora_llm's stub process died" in server.log_path.read_text()
    finally:
        server.stop()


# Appended to a copy of lora_llm's model.py: once the file TRIGGER exists, every forward of the engine raises
# what torch raises after an illegal memory access on the GPU (the fault, injected for this test only).
LOSE_THE_GPU = """

import os as _os

import torch as _torch

_initialize = TritonPythonModel.initialize


def _initialize_then_lose_the_gpu_on_trigger(self, args):
    _initialize(self, args)
    forward = self.engine.runner.forward

    def lost(step):
        if _os.path.exists(TRIGGER):
            raise _torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        return forward(step)

    self.engine.runner.forward = lost


TritonPythonModel.initialize = _initialize_then_lose_the_gpu_on_trigger
"""


@pytest.mark.heavy
def test_a_lost_gpu_stops_the_server(fault_assets, tmp_path):
    """The GPU is lost while streams run on every front door: each ends with an UNAVAILABLE error that
    names the fault (no hang), a request sent after it is refused, the server's health fails and it
    exits, with the reason in its log: whatever supervises it (docker --restart always, Kubernetes)
    starts a new one."""
    trigger = tmp_path / "lose-the-gpu"
    repo = copy_repository(tmp_path / "repo", max_tokens_limit=str(LONG))
    model_py = repo / "lora_llm" / "1" / "model.py"
    model_py.write_text(model_py.read_text() + f"\nTRIGGER = {str(trigger)!r}\n" + LOSE_THE_GPU)
    env = {ENV_BASE_MODEL: str(fault_assets / "base"), ENV_ADAPTER_DIR: str(fault_assets / "adapters")}
    server = TritonServer(repository=repo, env=env, log_path=tmp_path / "tritonserver.log").start()
    values = dict(max_tokens=LONG, end_id=-1)
    calls = [
        partial(generate, server.grpc_url, "lora_llm", input_ids=[1, 5, 6], lora_name="qv-r4", stream=True, **values),
        partial(generate, server.grpc_url, "lora_llm", input_ids=[1, 7], **values),
        partial(generate, server.grpc_url, "ensemble", text_input="Beautiful is", stream=True, **values),
        partial(infer, server.http_url, "http", "lora_text", text_input="Beautiful is", **values),
    ]
    try:
        with ThreadPoolExecutor(len(calls)) as pool:
            running = [pool.submit(call) for call in calls]
            time.sleep(1.0)
            assert not any(f.done() for f in running)
            trigger.touch()
            errors = []
            for future in running:
                with pytest.raises(InferenceServerException) as e:
                    future.result(timeout=30)
                errors.append(e.value.message())
        assert all("the GPU failed (illegal memory access)" in m for m in errors), errors
        with pytest.raises(InferenceServerException):
            generate(server.grpc_url, "lora_llm", input_ids=[1, 5], max_tokens=2)
        deadline = time.monotonic() + 20
        while server.ready() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not server.ready()
        assert server.process.wait(60) == 0  # the watch's SIGTERM: Triton's graceful stop, which exits 0
        log = server.log_path.read_text()
        assert "the device can no longer serve (illegal memory access)" in log
        assert "the engine thread stopped: stopping tritonserver so that it can be restarted" in log
    finally:
        server.stop()


def test_engine_gauges_return_to_zero(fserver):
    threads = [threading.Thread(target=good_call, args=(fserver, *g)) for g in GOOD]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(0.3)
    assert fserver.metric("lora_engine_running_sequences") == 0
    assert fserver.metric("lora_adapter_slots_in_use") == 0


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_cli_without_a_server_is_one_line_and_exit_2(protocol):
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "client", "hi", "--url", "localhost:1", "--protocol", protocol],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: "), run.stderr
