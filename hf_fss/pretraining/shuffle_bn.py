"""
Shuffle-BN for the key encoder (MoCo §3.3, `moco/builder.py` `_batch_shuffle_ddp` / `_batch_unshuffle_ddp`): the
key images of all processes are gathered, permuted by a permutation drawn on process 0 and broadcast, each process
encodes its slice of the shuffled batch, and the outputs are gathered and put back in order, so a batch-norm layer
of the key encoder never sees a query's own key among its batch statistics. On one process the same effect comes
from `SplitBatchNorm` (MoCo's single-GPU colab demo): batch statistics over `num_splits` interleaved sub-batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SplitBatchNorm", "convert_to_split_batchnorm", "shuffled_forward"]


class SplitBatchNorm(nn.BatchNorm2d):
    """
    `BatchNorm2d` whose training-mode statistics are computed over `num_splits` sub-batches (sample `n` belongs to
    split `n % num_splits`), as `num_splits` processes with plain BN would; the running statistics are the mean of
    the splits'. Evaluation mode is plain `BatchNorm2d`. The state-dict keys are those of `BatchNorm2d`, so weights
    load into a plain backbone.

    Raises:
        `ValueError`: in training mode, a batch size not divisible by `num_splits`.
    """

    def __init__(self, num_features: int, num_splits: int = 8, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = int(num_splits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        batch, channels, height, width = x.shape
        splits = self.num_splits
        if batch % splits:
            raise ValueError(f"SplitBatchNorm: batch size {batch} is not divisible by bn_splits={splits}")
        mean_split = self.running_mean.repeat(splits)
        var_split = self.running_var.repeat(splits)
        out = F.batch_norm(
            x.view(-1, channels * splits, height, width),
            mean_split,
            var_split,
            self.weight.repeat(splits),
            self.bias.repeat(splits),
            True,
            self.momentum,
            self.eps,
        ).view(batch, channels, height, width)
        with torch.no_grad():
            self.running_mean.copy_(mean_split.view(splits, channels).mean(0))
            self.running_var.copy_(var_split.view(splits, channels).mean(0))
            self.num_batches_tracked.add_(1)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


def convert_to_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every `BatchNorm2d` of `module` by a `SplitBatchNorm` with the same parameters and statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm):
            split = SplitBatchNorm(child.num_features, num_splits, eps=child.eps, momentum=child.momentum)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            convert_to_split_batchnorm(child, num_splits)
    return module


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@torch.no_grad()
def shuffled_forward(function: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """
    `function(images)` computed on a shuffled batch and returned in the original order.

    Under N processes (every process calls it with the same batch size `n`): all key images are gathered, a
    permutation of the `N * n` images drawn on process 0 (torch's global generator, checkpointed per process) is
    broadcast, this process computes its slice, and the outputs are gathered and unshuffled. On one process the
    batch is permuted locally (with `SplitBatchNorm` this spreads a batch's images over the splits at random).

    Args:
        function: e.g. the key encoder, `(n, 3, H, W) -> (n, ...)`.
        images: `(n, 3, H, W)` this process's key images.

    Returns:
        `torch.Tensor`: `function`'s output for `images`, row `i` for image `i`.
    """
    if not _distributed():
        permutation = torch.randperm(images.shape[0]).to(images.device)
        return function(images[permutation])[torch.argsort(permutation)]
    from accelerate.utils import broadcast, gather

    rank, count = torch.distributed.get_rank(), images.shape[0]
    everything = gather(images.contiguous())
    permutation = torch.randperm(everything.shape[0]).to(images.device)
    permutation = broadcast(permutation, from_process=0)
    mine = function(everything[permutation[rank * count : (rank + 1) * count]])
    outputs = gather(mine.contiguous())
    return outputs[torch.argsort(permutation)][rank * count : (rank + 1) * count]
