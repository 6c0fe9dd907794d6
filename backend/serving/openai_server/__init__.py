"""The OpenAI-compatible server: its own process, in front of tritonserver's lora_llm over gRPC streams."""
