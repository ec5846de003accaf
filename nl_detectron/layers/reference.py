"""The paper's formula computed directly, materialising the ``(N, HW, M)`` pairwise map: the one
naive reference that the tests check :class:`NonLocalBlock` against and the benchmarks time it
against. It shares the block's weights."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .non_local_block import NonLocalBlock
from .tensor_ops import pool_window

__all__ = ["NaiveNonLocal"]

_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


class NaiveNonLocal(nn.Module):
    """Eq. 1 and 6 of the paper with the full pairwise map, on ``block``'s weights.

    ``concat="pairs"`` builds the released code's ``(N, 2C', HW, M)`` tensor of concatenated
    pairs for ``w_f``; ``concat="split"`` materialises only ``ReLU(a_i + b_j)`` ``(N, HW, M)``.
    """

    def __init__(self, block: NonLocalBlock, concat: str = "pairs") -> None:
        super().__init__()
        if concat not in ("pairs", "split"):
            raise ValueError(f"concat must be 'pairs' or 'split'; got {concat!r}.")
        self.block = block
        self.concat = concat

    def forward(self, x: Tensor) -> Tensor:
        b = self.block
        batch, _, *spatial = x.shape
        theta = x if b.theta is None else b.theta(x)
        window = pool_window(b.dim)

        def pool(t: Tensor) -> Tensor:
            # ceil_mode: a partial window at an odd border is pooled over what it covers
            return _MAX_POOL[b.dim](t, window, window, ceil_mode=b.ceil_mode)

        source = pool(x) if b.sub_sample and b.pool_input else x
        phi = source if b.phi is None else b.phi(source)
        g = b.g(source)
        # the unary logits w_m^T x_j (disentangled, global context)
        unary = g[:, :1] if b.conv_mask is None else b.conv_mask(source)
        if b.sub_sample and not b.pool_input:
            phi, g, unary = pool(phi), pool(g), pool(unary)
        # (N, C', *S) -> (N, C', HW); (N, C', *S') -> (N, C', M)
        theta, phi = theta.flatten(2), phi.flatten(2)
        # (N, C', *S') -> (N, C', M) -> (N, M, C')
        g = g.flatten(2).transpose(1, 2)
        f = self.pairwise_map(theta, phi, unary.flatten(1))
        # (N, HW, M) @ (N, M, C') -> (N, HW, C') -> (N, C', HW) -> (N, C', *S)
        y = (f @ g).transpose(1, 2).reshape(batch, -1, *spatial)
        z = b.out_conv(y)
        if b.out_norm is not None:
            z = b.out_norm(z)
        return x + z

    def pairwise_map(self, theta: Tensor, phi: Tensor, unary: Optional[Tensor] = None) -> Tensor:
        """``f(x_i, x_j) / C(x)``: ``(N, C', HW), (N, C', M), (N, M) -> (N, HW, M)`` (``unary``:
        the logits ``w_m^T x_j`` of the disentangled and global-context forms)."""
        b = self.block
        m = phi.shape[2]
        if b.pairwise in ("embedded_gaussian", "gaussian"):
            # (N, C', HW) -> (N, HW, C'); (N, HW, C') @ (N, C', M) -> (N, HW, M)
            return torch.softmax(theta.transpose(1, 2) @ phi * b.scale, dim=2)
        if b.pairwise in ("disentangled", "global_context"):
            assert unary is not None
            # (N, M) -> (N, 1, M) -> (N, HW, M): the same weights for every query
            weights = torch.softmax(unary, dim=1)[:, None, :].expand(-1, theta.shape[2], -1)
            if b.pairwise == "global_context":
                return weights
            # whitened: the means over the query and the key positions removed
            theta = theta - theta.mean(dim=2, keepdim=True)
            phi = phi - phi.mean(dim=2, keepdim=True)
            logits = theta.transpose(1, 2) @ phi * (b.pairwise_fn.scale)
            return torch.softmax(logits, dim=2) + weights
        if b.pairwise == "dot_product":
            return theta.transpose(1, 2) @ phi / m
        w_f = b.concat_project.weight.flatten()
        n = theta.shape[2]
        if self.concat == "split":
            a = torch.einsum("c,bcn->bn", w_f[: b.inner_channels], theta)
            c = torch.einsum("c,bcm->bm", w_f[b.inner_channels :], phi)
            # (N, HW, 1) + (N, 1, M) -> (N, HW, M)
            return F.relu(a[:, :, None] + c[:, None, :]) / m
        # (N, C', HW, M) x 2 -> (N, 2C', HW, M): all concatenated pairs [theta_i, phi_j]
        pairs = torch.cat(
            [theta[:, :, :, None].expand(-1, -1, n, m), phi[:, :, None, :].expand(-1, -1, n, m)],
            dim=1,
        )
        # (N, 2C', HW, M) -> (N, HW, M), w_f applied as in the block's 1x1 conv
        return F.relu(torch.einsum("c,bcnm->bnm", w_f, pairs)) / m
