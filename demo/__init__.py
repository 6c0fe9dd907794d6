"""The demo: SmolLM2-135M-Instruct (from a wheel, no model hub) and four LoRA adapters trained on it."""
