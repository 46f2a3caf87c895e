"""The paper's Algorithm 1 ("PyTorch code of our ConvNN module"), transcribed literally.

The reference the optimised layers are compared with (``tests/test_layers_map.py`` and
``scripts/bench_layers.py``); part of the package so the benchmark never imports the tests.
Changes to the printed listing, none of them semantic: the channel
counts the listing leaves out are arguments, ``k.T`` on the batched ``[B, C, N]`` tensor is
``k.transpose(1, 2)``, and a map ``[B, C, H, W]`` enters flattened (:func:`algorithm1_on_map`).
Note the listing's own conventions: ``S[i, j] = k_i . q_j`` (keys play the query role), all N
tokens compete (no self-first rule, no padding), and with ``rho != "softmax"`` the gathered rows
are scaled by the raw top-k similarities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Algorithm1ConvNN(nn.Module):
    """Algorithm 1 on token sequences in Conv1d layout: ``[B, C, N] -> [B, C', N]``."""

    def __init__(self, in_channels: int, out_channels: int, k: int = 9, rho: str = "softmax") -> None:
        super().__init__()
        self.k, self.rho = k, rho
        self.conv1d = nn.Conv1d(in_channels, out_channels, kernel_size=k, stride=k)
        self.w_k = nn.Conv1d(in_channels, in_channels, kernel_size=1, stride=1)
        self.w_q = nn.Conv1d(in_channels, in_channels, kernel_size=1, stride=1)
        self.w_v = nn.Conv1d(in_channels, in_channels, kernel_size=1, stride=1)

    def forward(self, x: Tensor) -> Tensor:
        # Project the input
        k, q, v = self.w_k(x), self.w_q(x), self.w_v(x)
        # Compute Similarities
        k_norm = F.normalize(k, p=2, dim=1)
        q_norm = F.normalize(q, p=2, dim=1)
        S = k_norm.transpose(1, 2) @ q_norm
        # Select Neighbors
        kmax, kargmax = torch.topk(S, k=self.k, dim=-1)
        if self.rho == "softmax":
            kmax = torch.softmax(kmax, dim=-1)
        # Neighbor Gathering and Modulation
        v = v.unsqueeze(-1).expand(*x.shape, self.k)
        kmax = kmax.unsqueeze(1).expand(*x.shape, self.k)
        kargmax = kargmax.unsqueeze(1).expand(*x.shape, self.k)
        x_nn = kmax * torch.gather(v, dim=2, index=kargmax)
        # Neighbor Aggregation
        b, c, _ = x.shape
        return self.conv1d(x_nn.view(b, c, -1))


def algorithm1_on_map(module: Algorithm1ConvNN, x: Tensor) -> Tensor:
    """Algorithm 1 on a map as the paper says (flatten, run, reshape): ``[B, C, H, W] -> [B, C', H, W]``."""
    return module(x.flatten(2)).unflatten(2, x.shape[-2:])
