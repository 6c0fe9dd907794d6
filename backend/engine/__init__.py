"""Continuous batching: requests, sequences, the scheduler, KV-cache blocks and the prefix cache, sampling."""
