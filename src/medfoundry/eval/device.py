"""Host data to the model's device without waiting for the device.

A copy from ordinary (pageable) host memory to a GPU first waits for every operation already queued on the
device: in the middle of a batch that is a full synchronization. Through pinned memory the copy is queued
like any other operation (PyTorch keeps the pinned buffer alive until the copy has run), and the host goes on
preparing the rest of the batch. On a CPU the data is only wrapped (a NumPy array's memory is shared).
"""

from __future__ import annotations

import torch


def upload(data, device: torch.device | str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``data`` (a list, a NumPy array or a CPU tensor; token ids and indices, so int64 unless ``dtype`` says
    otherwise, also when empty) as a tensor on ``device``."""
    tensor = torch.as_tensor(data, dtype=dtype)
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
