"""The device an engine runs on and what happens when it is lost: the device of each Triton model instance
(from the arguments Triton passes to initialize), which CUDA errors lose the GPU, and an engine that
meets one (injected into its forward) fails every request, stops and stops reporting itself serving,
while an ordinary failure fails only the requests of its step."""

import logging

import pytest
import torch

from backend.config import instance_device
from backend.errors import RequestError
from backend.model.device_faults import device_lost
from tests.conftest import peft_generate
from tests.test_engine import WAIT_S, Collector, all_blocks_free, make_engine, prompts, request, run_all, warm


def triton_args(kind: str, device_id: int = 0) -> dict[str, str]:
    """What Triton passes to initialize, besides the model's config: every value a string."""
    return {
        "model_name": "lora_llm",
        "model_instance_kind": kind,
        "model_instance_name": f"lora_llm_{device_id}_0",
        "model_instance_device_id": str(device_id),
        "model_repository": "/models/lora_llm",
        "model_version": "1",
    }


@pytest.mark.parametrize(
    "setting, kind, device_id, device",
    [
        ("auto", "GPU", 0, "cuda:0"),
        ("auto", "GPU", 3, "cuda:3"),
        ("cuda", "GPU", 1, "cuda:1"),
        ("auto", "CPU", 0, "auto"),  # KIND_CPU: the engine picks as before (cuda if there is one)
        ("auto", "MODEL", 0, "auto"),
        ("cpu", "CPU", 0, "cpu"),
        ("cuda:1", "CPU", 0, "cuda:1"),
        ("cuda:1", "GPU", 0, "cuda:1"),  # an explicit device wins over the instance's GPU
        ("cpu", "GPU", 2, "cpu"),
        ("cuda:2", "GPU", 2, "cuda:2"),
    ],
)
def test_the_device_of_each_instance(setting, kind, device_id, device):
    assert instance_device(setting, triton_args(kind, device_id))[0] == device


def test_the_log_says_which_device_an_instance_took():
    assert instance_device("auto", triton_args("CPU"))[1] == ""
    assert instance_device("auto", triton_args("GPU", 1))[1] == "device cuda:1: this KIND_GPU instance's GPU"
    why = instance_device("cuda:0", triton_args("GPU", 1))[1]
    assert why == "device cuda:0 as set, not this KIND_GPU instance's GPU (cuda:1)"


# What torch 2.13 (c10_cuda_check_implementation), Triton's launcher (driver.c gpuAssert) and cuBLAS raise.
HINT = "\nCUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below"


def torch_error(text: str) -> torch.AcceleratorError:
    return torch.AcceleratorError(f"CUDA error: {text}{HINT}")


LOST = {
    "illegal address": (torch_error("an illegal memory access was encountered"), "illegal memory access"),
    "device-side assert": (torch_error("device-side assert triggered"), "device-side assert"),
    "Triton launch": (RuntimeError("Triton Error [CUDA]: unspecified launch failure"), "unspecified launch failure"),
    "cuBLAS": (
        RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, opa, opb, ...)`"),
        "cuBLAS execution failed",
    ),
    "misaligned": (torch_error("misaligned address"), "misaligned address"),
    "ECC": (torch_error("uncorrectable ECC error encountered"), "uncorrectable ECC error"),
}
KEPT = {
    "out of memory": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "a shape bug": RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x64 and 32x64)"),
    "not a RuntimeError": ValueError("an illegal memory access was encountered"),
}


@pytest.mark.parametrize("case", LOST)
def test_sticky_cuda_errors_lose_the_device(case):
    error, reason = LOST[case]
    assert device_lost(error) == reason
    try:  # raised while handling it, or from it: the chain is read
        try:
            raise error
        except RuntimeError as inner:
            raise RuntimeError("engine step failed") from inner
    except RuntimeError as outer:
        assert device_lost(outer) == reason


@pytest.mark.parametrize("case", KEPT)
def test_other_errors_do_not(case):
    assert device_lost(KEPT[case], check=lambda: None) is None


def test_another_cuda_error_asks_the_device():
    """A CUDA error not known to be sticky loses the device only if a device call fails after it."""
    error = torch.AcceleratorError("CUDA error: unknown error")

    def broken():
        raise torch.AcceleratorError("CUDA error: unknown error\nmore")

    assert device_lost(error, check=lambda: None) is None
    assert (
        device_lost(error, check=broken)
        == "the device fails after CUDA error: unknown error: CUDA error: unknown error"
    )
    assert device_lost(error, check=None) is None  # on a CPU nothing is asked


class LoseDevice:
    """A runner's forward that raises `error` on its calls from the `nth` on (`times` of them; None: all)."""

    def __init__(self, real, nth: int, error: Exception, times: int | None = None):
        self.real, self.nth, self.error, self.times, self.calls = real, nth, error, times, 0

    def __call__(self, *args, **kw):
        self.calls += 1
        if self.calls >= self.nth and (self.times is None or self.calls < self.nth + self.times):
            raise self.error
        return self.real(*args, **kw)


def test_a_lost_device_fails_every_request_and_stops_the_engine(assets, vocab, caplog):
    """The second step raises an illegal-address error: the running and the waiting requests all get
    UNAVAILABLE naming it, the engine thread ends and reports itself not serving, later submits are
    refused, nothing is left held, the error is logged with its reason, and no step runs after it."""
    engine = warm(make_engine(assets / "base", assets / "adapters", max_num_seqs=2), "qv-r4", "mlp-r64")
    lose = LoseDevice(engine.runner.forward, 2, LOST["illegal address"][0])
    engine.runner.forward = lose
    ps = prompts(vocab, [5, 7, 6, 4, 8], seed=41)
    names = ["qv-r4", "", "mlp-r64", "qv-r4", ""]
    outs = [Collector() for _ in ps]
    for ids, name, c in zip(ps, names, outs):
        engine.submit(request(ids, name, 20), c)
    with caplog.at_level(logging.ERROR, logger="lora_engine"):
        engine.start()
        assert all(c.done.wait(WAIT_S) for c in outs)
        engine.thread.join(WAIT_S)
    assert not engine.thread.is_alive() and not engine.serving
    for c in outs:
        assert c.final.error.code == "UNAVAILABLE"
        assert c.final.error.message == (
            "the engine is not running: the GPU failed (illegal memory access); the server is restarting"
        )
    assert lose.calls == 2
    with pytest.raises(RequestError) as e:
        engine.submit(request(ps[0]), Collector())
    assert e.value.code == "UNAVAILABLE" and "the GPU failed" in e.value.message
    assert all_blocks_free(engine) and all(s.refs == 0 for s in engine.adapters.slots)
    (record,) = [r for r in caplog.records if "can no longer serve" in r.getMessage()]
    assert record.levelno == logging.ERROR and "(illegal memory access)" in record.getMessage() and record.exc_info


def test_an_ordinary_failure_fails_its_step_alone(assets, peft_model, vocab):
    """The same injection with an ordinary error, once: the two running requests fail (INTERNAL), the
    one waiting is served after them, and the engine goes on serving."""
    engine = warm(make_engine(assets / "base", assets / "adapters", max_num_seqs=2), "qv-r4")
    error = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    engine.runner.forward = LoseDevice(engine.runner.forward, 2, error, times=1)
    ps = prompts(vocab, [5, 7, 6], seed=43)
    outs = run_all(engine, [request(ids, "qv-r4", 3) for ids in ps])
    assert [c.final.error.code if c.final.error else None for c in outs] == ["INTERNAL", "INTERNAL", None]
    assert outs[2].token_ids == peft_generate(peft_model, ps[2], "qv-r4", 3)
    assert engine.serving and engine.fault is None
    engine.shutdown()
