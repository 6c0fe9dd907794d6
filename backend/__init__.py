"""Multi-LoRA serving engine: adapter store, LoRA layers, continuous-batching engine."""
