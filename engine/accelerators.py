"""Whether torch could find a GPU here, judged without importing torch (which alone costs seconds)."""

from __future__ import annotations

import os

DRIVER_FILES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")  # CUDA, ROCm, WSL's GPU


def gpu_may_be_present() -> bool:
    """True where a GPU driver's device file exists and CUDA_VISIBLE_DEVICES does not hide every device:
    work that a GPU would speed up then goes to torch rather than to ONNX Runtime on the CPU."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    return any(os.path.exists(path) for path in DRIVER_FILES)
