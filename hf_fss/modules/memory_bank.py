"""A memory bank of feature rows shared by every process: NTRENet's DO-prototype bank, MoCo-style key queues."""

from __future__ import annotations

import torch


def gather_rows(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """
    Concatenate `rows` `(n, d)` of every process in rank order (processes may hold different `n`, e.g. on the last
    batch), with Accelerate's `pad_across_processes` + `gather`; without a distributed run it returns `rows`.

    Returns:
        `tuple(torch.Tensor, int)`: the gathered rows `(sum n, d)` and the offset of this process's rows in them.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows, 0
    from accelerate.utils import gather, pad_across_processes

    counts = gather(torch.tensor([rows.shape[0]], device=rows.device)).tolist()
    padded = gather(pad_across_processes(rows.contiguous(), dim=0))
    width = max(counts)
    pieces = [padded[rank * width : rank * width + count] for rank, count in enumerate(counts)]
    return torch.cat(pieces), sum(counts[: torch.distributed.get_rank()])


class MemoryBank:
    """
    First-in-first-out banks of feature rows, one per integer key (an unkeyed queue uses one key), newest first,
    each capped at `size` rows, with a seeded generator for random draws.

    Training state, not weights: a plain object (no `nn.Module`, no buffers), so it stays out of
    `model.state_dict()` and released checkpoints. `state_dict()` holds only tensors and numbers, so a checkpoint
    of it needs no pickle; a resumed run continues exactly (rows and generator state).

    Every process must call `push_gathered` with its own rows: the rows of all processes are gathered (rank order)
    before insertion, so all processes hold identical banks, and `sample` draws in the same order everywhere.

    Args:
        size (`int`): rows kept per key.
        seed (`int`, *optional*, defaults to 0): seed of the CPU generator used by `sample`.
    """

    def __init__(self, size: int, seed: int = 0):
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.size = int(size)
        self.seed = int(seed)
        self.rows: dict[int, torch.Tensor] = {}
        self.generator = torch.Generator().manual_seed(self.seed)

    def __len__(self) -> int:
        return sum(v.shape[0] for v in self.rows.values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, seed={self.seed}, keys={len(self.rows)}, entries={len(self)})"

    def reset(self) -> None:
        """Empty the bank and reseed its generator."""
        self.rows = {}
        self.generator = torch.Generator().manual_seed(self.seed)

    def entries(self, key: int = 0) -> torch.Tensor | None:
        """The rows of `key`, newest first, `(n, d)`; `None` when the key has none."""
        return self.rows.get(int(key))

    def push(self, key: int, rows: torch.Tensor) -> None:
        """Insert `rows` `(n, d)` (already gathered) at the front of `key`'s queue; the oldest beyond `size` go."""
        key = int(key)
        old = self.rows.get(key)
        if old is not None:
            rows = torch.cat([rows, old.to(rows.device)])
        self.rows[key] = rows[: self.size].detach().clone()

    @torch.no_grad()
    def push_gathered(self, keys: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """
        Gather `keys` `(n,)` and `rows` `(n, d)` of every process, then push each key's rows in gathered order.

        Returns:
            `tuple(torch.LongTensor, torch.Tensor, int)`: gathered keys, gathered rows and this process's offset.
        """
        packed = torch.cat([keys.to(rows.device, torch.float64).unsqueeze(1), rows.double()], dim=1)
        packed, offset = gather_rows(packed)
        all_keys = packed[:, 0].round().long()
        all_rows = packed[:, 1:].to(rows.dtype)
        for key in torch.unique(all_keys).tolist():
            self.push(key, all_rows[all_keys == key])
        return all_keys, all_rows, offset

    def sample(self, key: int, count: int) -> torch.Tensor:
        """Up to `count` rows of `key` (all when it has no more), drawn with the bank's generator."""
        entries = self.rows[int(key)]
        if entries.shape[0] <= count:
            return entries
        chosen = torch.randperm(entries.shape[0], generator=self.generator)[:count]
        return entries[chosen.to(entries.device)]

    def state_dict(self) -> dict:
        keys = sorted(self.rows)
        return {
            "size": self.size,
            "seed": self.seed,
            "keys": keys,
            "rows": [self.rows[k].detach().cpu().clone() for k in keys],
            "generator_state": self.generator.get_state(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.size = int(state_dict["size"])
        self.seed = int(state_dict["seed"])
        self.rows = {int(k): r.detach().clone() for k, r in zip(state_dict["keys"], state_dict["rows"])}
        self.generator = torch.Generator()
        self.generator.set_state(state_dict["generator_state"])
