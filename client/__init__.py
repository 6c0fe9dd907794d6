"""Client library and CLI for the LoRA model repository (tritonclient over HTTP and gRPC)."""
