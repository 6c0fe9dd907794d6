"""The model on the device: loading, wrapping, packing, attention over the paged KV cache, one step's forward."""
