"""MoCo's queue of keys (`moco/builder.py`: `queue`, `queue_ptr`) as a ring buffer on the project's `MemoryBank`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_fss.modules.memory_bank import MemoryBank

__all__ = ["KeyQueue"]


class KeyQueue(MemoryBank):
    """
    A fixed-size ring buffer of `size` L2-normalised key rows of width `dim` (one key, 0), initialised as MoCo does
    (`randn`, then normalised; drawn from `seed`), with a write pointer: the newest keys replace the oldest.

    `push_gathered(keys, rows)` (inherited) gathers the rows of every process in rank order before writing, so every
    process holds the same queue. Unlike MoCo, any batch size works (the write wraps around; MoCo asserts
    `K % batch == 0`). `state_dict()` holds the rows, the pointer and the generator: a checkpoint restores it exactly.
    """

    def __init__(self, size: int, dim: int, seed: int = 0):
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = int(dim)
        super().__init__(size, seed)
        self.reset()

    def reset(self) -> None:
        super().reset()
        initial = torch.randn(self.size, self.dim, generator=torch.Generator().manual_seed(self.seed))
        self.rows = {0: F.normalize(initial, dim=1)}
        self.pointer = 0

    @property
    def keys(self) -> torch.Tensor:
        """The `(size, dim)` rows, in buffer order (not newest first)."""
        return self.rows[0]

    def to(self, device: torch.device | str) -> KeyQueue:
        self.rows[0] = self.rows[0].to(device)
        return self

    def push(self, key: int, rows: torch.Tensor) -> None:
        """Write `rows` `(n, dim)` (already gathered) at the pointer, wrapping around; advance the pointer."""
        if int(key) != 0:
            raise ValueError(f"a KeyQueue has the single key 0, got {key}")
        buffer = self.rows[0]
        rows = rows.detach().to(buffer.device, buffer.dtype)[-self.size :]
        positions = (self.pointer + torch.arange(rows.shape[0], device=buffer.device)) % self.size
        buffer[positions] = rows
        self.pointer = int((self.pointer + rows.shape[0]) % self.size)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "dim": self.dim, "pointer": self.pointer}

    def load_state_dict(self, state_dict: dict) -> None:
        device = self.rows[0].device
        super().load_state_dict(state_dict)
        self.dim = int(state_dict["dim"])
        self.pointer = int(state_dict["pointer"])
        self.rows[0] = self.rows[0].to(device)
