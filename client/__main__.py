"""Send a prompt to the model repository, optionally with a LoRA adapter.

    python -m client "Beautiful is" --lora qv-r4                      # unary, HTTP, model lora_text
    python -m client "Beautiful is" --lora qv-r4 --protocol grpc      # unary, gRPC
    python -m client "Beautiful is" --lora qv-r4 --stream             # gRPC stream, model ensemble

Exits non-zero (2) on an error response, printing Triton's status and message.
"""

import argparse
import sys

from client.api import InferenceServerException, infer, stream


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m client", description=__doc__.split("\n\n")[0])
    p.add_argument("prompt")
    p.add_argument("--lora", default=None, help="adapter name (default: the base model)")
    p.add_argument("--protocol", choices=["http", "grpc"], default="http")
    p.add_argument("--url", default=None, help="host:port (default localhost:8000 http, localhost:8001 grpc)")
    p.add_argument("--stream", action="store_true", help="stream tokens over gRPC from the ensemble")
    p.add_argument("--model", default=None, help="default: ensemble when streaming, else lora_text")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--include-input", action="store_true", help="unary: the prompt in front of the answer")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    protocol = "grpc" if a.stream else a.protocol
    url = a.url or ("localhost:8001" if protocol == "grpc" else "localhost:8000")
    values = dict(
        text_input=a.prompt,
        lora_name=a.lora,
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        seed=a.seed,
        exclude_input_in_output=not a.include_input,
    )
    try:
        if a.stream:
            for chunk in stream(url, a.model or "ensemble", stream=True, **values):
                print(chunk.text, end="", flush=True)
            print()
        else:
            print(infer(url, protocol, a.model or "lora_text", **values).text)
    except InferenceServerException as e:
        print(f"error: {e.status()}: {e.message()}", file=sys.stderr)
        return 2
    except OSError as e:  # no server there (HTTP); gRPC reports it as an InferenceServerException
        print(f"error: cannot reach the server at {url}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
