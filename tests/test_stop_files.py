"""The files through which the front doors watch lora_llm's stub, outside a server."""

import os
import sys
import types

import pytest


@pytest.fixture
def stops(tmp_path, monkeypatch):
    pb_utils = types.ModuleType("triton_python_backend_utils")  # what backend.serving.triton_io reads at import
    pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb_utils)
    monkeypatch.delitem(sys.modules, "backend.serving.triton_io", raising=False)  # imported afresh, forgotten after
    from backend.serving.triton_io import StopFiles

    return StopFiles(str(tmp_path))


def test_a_pid_file_left_by_an_earlier_server_with_the_same_pid_is_ignored(stops):
    assert stops.process_alive("lora_llm") is None
    stops.publish_pid("lora_llm")
    assert stops.process_alive("lora_llm") is True
    path = os.path.join(stops.dir, "lora_llm.pid")
    with open(path, "w") as f:
        f.write(str(2**22 + 1))  # above any pid_max: no such process
    assert stops.process_alive("lora_llm") is False
    before = stops.server_started - 600  # a server that had this pid ten minutes ago
    os.utime(path, (before, before))
    assert stops.process_alive("lora_llm") is None
