"""Synchronised batch norm that also synchronises CPU tensors (the gloo backend).

``torch.nn.SyncBatchNorm`` computes its statistics over all processes, but only for CUDA (and a
few other accelerator) tensors: in CPU training with ``torch.distributed`` initialised it raises
``ValueError("SyncBatchNorm expected input tensor to be on GPU ...")``, and
``DistributedDataParallel`` refuses any CPU model that contains one ("SyncBatchNorm layers only
work with GPU modules"). :class:`SyncBatchNorm` uses torch's implementation for accelerators and
adds the CPU case: the batch mean and variance over every process's batch, from two
differentiable all-reduces, weighted by each process's number of elements (so processes with
different or empty batches, e.g. a different number of RoIs in a head, are handled exactly). The
result equals ``BatchNorm`` over the concatenated batch, in the forward pass, the gradients and
the running statistics. It is not an ``nn.SyncBatchNorm`` subclass (DDP's check), but has the same
parameters, buffers and checkpoint keys.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.nn.functional import all_reduce
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SyncBatchNorm"]


def _statistics_input(input: Tensor) -> Tensor:
    """What torch's synchronised batch norm gets: an empty half-precision input in float32.

    Every process all-gathers a buffer of its mean, inverse std and count. A process with
    elements computes them in float32 whatever the input's precision; an empty one (no RoIs in a
    head) fills zeros in the input's dtype. Under autocast that is float16 or bfloat16: the
    processes then pass buffers of different byte counts to one collective, which hangs NCCL or
    mixes garbage into every process's statistics. Upcast, the empty process sends float32 too.
    """
    if input.numel() == 0 and input.dtype in (torch.float16, torch.bfloat16):
        return input.float()
    return input


class SyncBatchNorm(_BatchNorm):
    """Batch norm synchronised across the processes of ``process_group`` (default: all), on
    accelerators as ``nn.SyncBatchNorm`` and also on CPU, e.g. in multi-process CPU training
    with the gloo backend.

    Input: ``(N, C, *S)`` with any number of spatial dimensions (also none), output: the same.
    Evaluation mode and single-process runs are plain batch norm.

    Args:
        num_features, eps, momentum, affine, track_running_stats: as for ``nn.BatchNorm2d``.
        process_group: the processes to synchronise; None: all.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input: Tensor) -> Tensor:
        if self.training and self._world_size() > 1:
            if input.device.type == "cpu":
                return self._cpu_sync_forward(input)
            # torch's kernels for accelerators; its forward needs only what this class has.
            out = nn.SyncBatchNorm.forward(self, _statistics_input(input))  # type: ignore[arg-type]
            return out.to(input.dtype)
        return super().forward(input)

    @torch.jit.unused
    def _world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group or dist.group.WORLD)

    @torch.jit.unused
    def _cpu_sync_forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        group = self.process_group or dist.group.WORLD
        channels = input.shape[1]
        # Statistics in float32 whatever the input's precision.
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        dims = [0] + list(range(2, x.dim()))
        shape = [1, channels] + [1] * (x.dim() - 2)
        count = x.new_full([1], float(x.numel() // channels))

        # Two passes (mean, then the mean squared deviation) rather than E[x^2] - E[x]^2, which
        # loses precision when the mean is large against the spread.
        # (C,) sums and the element count -> (C + 1,) totals over all processes
        totals = all_reduce(torch.cat([x.sum(dims), count]), group=group)
        total = totals[channels].detach()
        mean = totals[:channels] / total.clamp(min=1)
        centred = x - mean.reshape(shape)
        squares = all_reduce((centred * centred).sum(dims), group=group)
        var = squares / total.clamp(min=1)

        if self.track_running_stats and self.running_mean is not None:
            assert self.running_var is not None and self.num_batches_tracked is not None
            if total.item() > 0:  # every process had an empty batch: no statistics to track
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average
                    factor = 1.0 / float(self.num_batches_tracked.item())
                else:
                    factor = self.momentum
                with torch.no_grad():
                    # Unbiased variance in the running estimate, as torch's batch norm.
                    unbiased = var * (total / (total - 1).clamp(min=1))
                    self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                    self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)

        out = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out.to(input.dtype)
