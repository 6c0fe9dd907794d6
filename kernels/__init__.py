"""Triton-language kernels for mixed-adapter LoRA, each with a plain torch reference beside it.

Nothing is imported here: whether @triton.jit compiles or interprets (TRITON_INTERPRET) is decided
when a kernel module is first imported, and backend/lora/ops.py decides that. Kernels call no
@triton.jit helpers (tl.cdiv and tl.zeros are such helpers): triton.language may have been imported, compiled, before
the interpreter was chosen, and such a helper then cannot run inside an interpreted kernel.
"""
