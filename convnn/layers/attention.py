"""Attention baselines for ViT slots on tokens ``[B, N, D]``: full, local (windowed) and sparse (band).

All share :class:`ProjectedAttention`: bias-free ``w_q, w_k, w_v`` (``D -> H*d``), heads split as
``[B, H, N, d]``, a subclass-specific ``attend``, heads merged back and a bias-free ``w_o``
(``H*d -> D'``). Attention dropout acts on the attention weights and only in training mode.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convnn.layers.registry import register_layer


def check_heads(channels: int, heads: int) -> None:
    """Raise ``ValueError`` unless ``heads`` is a positive divisor of ``channels``."""
    if heads < 1 or channels % heads:
        divisors = [h for h in range(1, channels + 1) if channels % h == 0]
        raise ValueError(f"heads={heads} must divide the width {channels}; allowed: {divisors}")


def check_dropout(dropout: float) -> None:
    """Raise ``ValueError`` unless ``0 <= dropout < 1``."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout} must lie in [0, 1)")


def check_positive(name: str, value: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")


def split_heads(t: Tensor, heads: int) -> Tensor:
    """``[B, N, H*d] -> [B, H, N, d]``; head ``h`` owns channels ``h*d .. (h+1)*d - 1``."""
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """``[B, H, N, d] -> [B, N, H*d]``, the inverse of :func:`split_heads`."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def masked_softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, dropout: float, training: bool
) -> Tensor:
    """Attention with explicit matmuls, restricted to the key positions where ``allowed`` is True.

    ``q [..., L, d]``, ``k, v [..., S, d]``, ``allowed`` bool broadcastable to ``[..., L, S]`` with at
    least one True per row. Scores are scaled by ``d**-0.5``; the softmax runs in at least float32, so
    masks and large scores stay finite under bf16 autocast. Returns ``[..., L, d]``.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    weights = weights.to(v.dtype)
    weights = F.dropout(weights, dropout, training)
    return torch.matmul(weights, v)


class ProjectedAttention(nn.Module):
    """Q/K/V projections, per-head ``attend`` and output projection: ``[B, N, D] -> [B, N, D']``.

    ``head_dim=None`` gives ``d = D / heads`` (inner width ``D``); otherwise the inner width is
    ``heads * head_dim``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, heads: int, dropout: float, head_dim: int | None = None
    ) -> None:
        super().__init__()
        check_positive("heads", heads)
        if head_dim is None:
            check_heads(in_channels, heads)
            inner = in_channels
        else:
            check_positive("dim_head", head_dim)
            inner = heads * head_dim
        check_dropout(dropout)
        self.heads = heads
        self.dropout = dropout
        self.w_q = nn.Linear(in_channels, inner, bias=False)
        self.w_k = nn.Linear(in_channels, inner, bias=False)
        self.w_v = nn.Linear(in_channels, inner, bias=False)
        self.w_o = nn.Linear(inner, out_channels, bias=False)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Per-head attention ``[B, H, N, d] x3 -> [B, H, N, d]``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """``[B, N, D] -> [B, N, D']``."""
        q, k, v = (split_heads(w(x), self.heads) for w in (self.w_q, self.w_k, self.w_v))
        return self.w_o(merge_heads(self.attend(q, k, v)))


@register_layer("attention", kind="tokens")
class Attention(ProjectedAttention):
    """Multi-head self-attention ``softmax(QK^T / sqrt(d)) V`` via ``F.scaled_dot_product_attention``.

    ``[B, N, D] -> [B, N, D']``. Parameters: ``4 * D^2`` for ``D' = D`` (147,456 at D = 192).
    """

    def __init__(self, in_channels: int, out_channels: int, heads: int = 1, dropout: float = 0.1) -> None:
        super().__init__(in_channels, out_channels, heads, dropout)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``[B, H, N, d] x3 -> [B, H, N, d]``."""
        p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p)


@register_layer("sparse_attention", kind="tokens")
class SparseAttention(ProjectedAttention):
    """Child et al.'s "local" sparse pattern, dense-masked: token i attends to j with
    ``|i - j| <= context // 2`` (the reference's band of ``context`` = 49 positions).

    ``[B, N, D] -> [B, N, D']``; parameters as :class:`Attention`. The reference left its attention
    dropout on at evaluation (the paper's Sparse-Attention row was evaluated that way); here dropout
    acts only in training mode.
    """

    def __init__(
        self, in_channels: int, out_channels: int, context: int = 49, heads: int = 1, dropout: float = 0.1
    ) -> None:
        super().__init__(in_channels, out_channels, heads, dropout)
        check_positive("context", context)
        self.context = context

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``[B, H, N, d] x3 -> [B, H, N, d]``."""
        pos = torch.arange(q.shape[-2], device=q.device)
        allowed = (pos[:, None] - pos[None, :]).abs() <= self.context // 2
        return masked_softmax_attention(q, k, v, allowed, self.dropout, self.training)


def apply_rotary(t: Tensor, positions: Tensor) -> Tensor:
    """Rotary position embedding of ``t [..., L, d]`` (d even) at float ``positions [L]``.

    The half-split convention of the ``local-attention`` package: channel pairs ``(c, c + d/2)`` are
    rotated by ``position * 10000^(-2c/d)``, computed in at least float32.
    """
    half = t.shape[-1] // 2
    dtype = torch.promote_types(t.dtype, torch.float32)
    inv_freq = 10000.0 ** (-torch.arange(half, device=t.device, dtype=dtype) / half)
    angles = positions.to(dtype)[:, None] * inv_freq[None, :]
    cos = torch.cat((angles.cos(), angles.cos()), dim=-1).to(t.dtype)
    sin = torch.cat((angles.sin(), angles.sin()), dim=-1).to(t.dtype)
    rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return t * cos + rotated * sin


@register_layer("local_attention", kind="tokens")
class LocalAttention(ProjectedAttention):
    """Windowed attention as the ``local-attention`` package computes it in the paper's runs.

    ``[B, N, D] -> [B, N, D']``. The sequence is zero-padded to a multiple of ``window`` and cut into
    blocks of ``window`` tokens; each block attends to itself and its two neighbouring blocks, and
    token i to token j only where ``|i - j| <= window`` (the package's ``exact_windowsize``). Padded
    tokens are masked out of every softmax (the package, called without a mask as in the reference,
    lets queries attend to the zero padding: a defect not reproduced here). With ``rotary`` the
    package's rotary embedding is applied inside each block: keys at their offset ``0 .. 3w-1`` in
    the 3-block span, queries at ``2w .. 3w-1``, so the rotary phase encodes ``j - i - window``.

    Parameter count: the reference builds this layer with ``dim_head=64`` per head, independent of
    the width, so with the paper's single head the inner width is 64, not 192: ``4 * 192 * 64 =
    49,152`` parameters per layer instead of attention's 147,456. The difference, 98,304 per layer x
    12 layers = 1,179,648, is exactly the gap between the paper's ViT-Tiny rows (5,479,306 ->
    4,299,658, "4.299M"; CIFAR-100 5,496,676 -> 4,317,028). Blocks make the cost O(N * 3w), not O(N^2).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        window: int = 128,
        heads: int = 1,
        dim_head: int = 64,
        rotary: bool = True,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(in_channels, out_channels, heads, dropout, head_dim=dim_head)
        check_positive("window", window)
        if rotary and dim_head % 2:
            raise ValueError(f"rotary=True needs an even dim_head, got dim_head={dim_head}")
        self.window = window
        self.rotary = rotary

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``[B, H, N, d] x3 -> [B, H, N, d]``."""
        b, h, n, d = q.shape
        w = self.window
        blocks = math.ceil(n / w)
        pad = blocks * w - n
        q, k, v = (F.pad(t, (0, 0, 0, pad)).reshape(b, h, blocks, w, d) for t in (q, k, v))
        k, v = (self._look_around(t) for t in (k, v))
        span = torch.arange(3 * w, device=q.device)
        query_pos = torch.arange(blocks * w, device=q.device).reshape(blocks, w)
        key_pos = (torch.arange(blocks, device=q.device)[:, None] - 1) * w + span  # [W, 3w]
        if self.rotary:
            q, k = apply_rotary(q, span[2 * w :]), apply_rotary(k, span)
        in_sequence = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] < n)
        allowed = in_sequence & ((query_pos[:, :, None] - key_pos[:, None, :]).abs() <= w)
        out = masked_softmax_attention(q, k, v, allowed, self.dropout, self.training)
        return out.reshape(b, h, blocks * w, d)[:, :, :n]

    @staticmethod
    def _look_around(t: Tensor) -> Tensor:
        """``[B, H, W, w, d] -> [B, H, W, 3w, d]``: each block with its previous and next block."""
        padded = F.pad(t, (0, 0, 0, 0, 1, 1))
        return torch.cat((padded[:, :, :-2], padded[:, :, 1:-1], padded[:, :, 2:]), dim=3)
