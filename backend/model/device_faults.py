"""Which failures lose the GPU: after a sticky CUDA error (an illegal address, a device-side assert, ...)
every later CUDA call of the process fails with it, so only a new process can serve again.

torch raises them as torch.AcceleratorError (a RuntimeError), "CUDA error: <cudaGetErrorString>"; Triton's
launcher as RuntimeError "Triton Error [CUDA]: <cuGetErrorString>"; cuBLAS / cuDNN report a fault they
meet as a failed execution. Any other CUDA error is checked by asking the device whether it still works."""

from collections.abc import Callable

# Texts of CUDA's sticky errors (cudaError_t: "the process is left in an inconsistent state") and the
# library statuses that report one.
STICKY = {
    "an illegal memory access was encountered": "illegal memory access",  # 700
    "device-side assert triggered": "device-side assert",  # 710
    "unspecified launch failure": "unspecified launch failure",  # 719
    "an illegal instruction was encountered": "illegal instruction",  # 715
    "misaligned address": "misaligned address",  # 716
    "operation not supported on global/shared address space": "invalid address space",  # 717
    "invalid program counter": "invalid program counter",  # 718
    "hardware stack error": "hardware stack error",  # 714
    "the launch timed out and was terminated": "launch timed out",  # 702
    "uncorrectable ECC error encountered": "uncorrectable ECC error",  # 214
    "uncorrectable NVLink error": "uncorrectable NVLink error",  # 220
    "CUBLAS_STATUS_EXECUTION_FAILED": "cuBLAS execution failed",
    "CUDNN_STATUS_EXECUTION_FAILED": "cuDNN execution failed",
}
CUDA_MARKS = ("CUDA error", "Triton Error [CUDA]", "CUBLAS_STATUS_", "CUDNN_STATUS_")


def chain(error: BaseException) -> list[BaseException]:
    """The error and those it was raised from or during."""
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def sticky_reason(error: BaseException) -> str | None:
    """The sticky CUDA error an exception (or one in its chain) reports, None if none."""
    for e in chain(error):
        if isinstance(e, RuntimeError):
            text = str(e)
            for mark, reason in STICKY.items():
                if mark in text:
                    return reason
    return None


def is_cuda_error(error: BaseException) -> bool:
    return any(
        type(e).__name__ == "AcceleratorError" or (isinstance(e, RuntimeError) and any(m in str(e) for m in CUDA_MARKS))
        for e in chain(error)
    )


def device_lost(error: BaseException, check: Callable[[], None] | None = None) -> str | None:
    """Why the device can no longer serve after `error`, or None if it can (the step alone failed).
    `check` (None on a CPU) runs a device call such as a synchronize: for a CUDA error not known to be
    sticky, the device is lost if that call fails too."""
    reason = sticky_reason(error)
    if reason is not None or check is None or not is_cuda_error(error):
        return reason
    try:
        check()
    except Exception as e:
        return f"the device fails after {first_line(error)}: {first_line(e)}"
    return None


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
