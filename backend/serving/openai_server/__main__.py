"""python -m backend.serving.openai_server [--triton-url localhost:8001] [--model-dir DIR] [--adapter-dir DIR] ...

Serves the OpenAI API in front of a running tritonserver (local, or an NGC container) that serves
lora_llm. Defaults come from LORA_BASE_MODEL, LORA_ADAPTER_DIR, GRPC_PORT and OPENAI_PORT."""

import argparse
import dataclasses
import logging
from pathlib import Path

import uvicorn

from backend.serving.openai_server.app import create_app
from backend.serving.openai_server.settings import Settings

SHUTDOWN_GRACE_S = 5  # at SIGTERM, streams still open after this are closed


def parse_settings(argv=None) -> tuple[Settings, argparse.Namespace]:
    d = Settings.from_env()
    p = argparse.ArgumentParser(prog="python -m backend.serving.openai_server", description=__doc__.split("\n\n")[1])
    p.add_argument("--triton-url", default=d.triton_url, help="tritonserver's gRPC host:port (%(default)s)")
    p.add_argument("--model-dir", type=Path, default=d.model_dir, help="the base model folder, for its tokenizer")
    p.add_argument("--adapter-dir", type=Path, default=d.adapter_dir, help="the adapter folders /v1/models lists")
    p.add_argument("--served-model-name", default=d.served_model_name, help="the base model's name in `model`")
    p.add_argument("--no-list-adapters", action="store_true", help="/v1/models shows the base model only")
    p.add_argument("--engine-model", default=d.engine_model, help="the Triton model that generates (%(default)s)")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--access-log", action="store_true", help="log every request")
    a = p.parse_args(argv)
    settings = dataclasses.replace(
        d,
        triton_url=a.triton_url,
        model_dir=a.model_dir.resolve(),
        adapter_dir=a.adapter_dir.resolve(),
        served_model_name=a.served_model_name,
        list_adapters=not a.no_list_adapters,
        engine_model=a.engine_model,
        host=a.host,
        port=a.port,
    )
    return settings, a


def main(argv=None) -> None:
    settings, a = parse_settings(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("openai_server").info("settings: %s", settings)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        access_log=a.access_log,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )


if __name__ == "__main__":
    main()
