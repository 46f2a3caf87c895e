"""ConvNN-attention for ViT slots (tokens ``[B, N, D]``) and KVT, both on the k-NN core ``convnn.knn``.

Per head: queries ``Q = w_q(x)`` of all N tokens, keys ``K = w_k(x_c)`` of the candidate tokens
``c`` only, values ``V = w_v(x)``; every token keeps its k best candidates by similarity
(:func:`convnn.knn.knn_select`), the selected value rows are gathered in Conv1d layout
``[B, D, N * k]``, scaled by ``rho`` of their similarities and aggregated by a Conv1d of kernel and
stride k (``aggregate``); ``w_o`` projects the result. Heads are folded into the batch for the k-NN
step, so head h selects with its own ``Q_h, K_h`` and gathers only its own channels
``h*d .. (h+1)*d - 1``.

With ``k = N``, ``rho="softmax"``, ``similarity="dot"``, ``self_first=False``, sampling "all" and a
unit depthwise aggregation the layer is exactly attention ``softmax(Q K^T / sqrt(d)) V`` followed by
``w_o`` (the paper's Sec. 5.2); with ``k < N`` it is KVT's top-k attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convnn.knn import (
    CandidateSampler,
    check_choice,
    gather_neighbors,
    knn_select,
    modulate,
    pair_similarity,
)
from convnn.layers.attention import check_dropout, check_heads, check_positive, split_heads
from convnn.layers.registry import register_layer

AGGREGATIONS = ("standard", "depthwise", "separable", "sum")
PROJECTIONS = ("linear", "identity")


class NeighborSum(nn.Module):
    """Parameter-free aggregation: ``[B, C, N * k] -> [B, C, N]``, the sum of each token's k rows.

    Equal to a depthwise Conv1d(kernel k, stride k) with unit weights that never train.
    """

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, N * k] -> [B, C, N]``."""
        b, c, nk = x.shape
        return x.reshape(b, c, nk // self.k, self.k).sum(-1)


def build_aggregation(channels: int, k: int, aggregation: str, bias: bool, unit_init: bool) -> nn.Module:
    """The neighbour aggregation ``[B, C, N * k] -> [B, C, N]`` (kernel = stride = k).

    standard: ``Conv1d(C, C, k)`` (``C^2 k`` weights); depthwise: ``Conv1d(C, C, k, groups=C)``
    (``C k``); separable: depthwise (bias-free) then pointwise ``Conv1d(C, C, 1)`` (``C k + C^2``);
    sum: no parameters. ``bias`` adds ``C`` to the last conv. ``unit_init`` starts every variant as
    the plain per-channel sum of the k rows (depthwise weights 1, pointwise and standard weights the
    channel identity, bias 0), i.e. attention's ``A V`` when ``rho`` is a softmax.
    """
    check_choice("aggregation", aggregation, AGGREGATIONS)
    if aggregation == "sum":
        if bias:
            raise ValueError("aggregation='sum' has no parameters; it needs bias=False")
        return NeighborSum(k)
    if aggregation == "standard":
        module = nn.Conv1d(channels, channels, k, stride=k, bias=bias)
    elif aggregation == "depthwise":
        module = nn.Conv1d(channels, channels, k, stride=k, groups=channels, bias=bias)
    else:
        module = nn.Sequential(
            nn.Conv1d(channels, channels, k, stride=k, groups=channels, bias=False),
            nn.Conv1d(channels, channels, 1, bias=bias),
        )
    if unit_init:
        with torch.no_grad():
            for conv in module.modules():
                if not isinstance(conv, nn.Conv1d):
                    continue
                if conv.groups == channels:
                    conv.weight.fill_(1.0)
                else:
                    conv.weight.copy_(torch.eye(channels)[:, :, None].expand_as(conv.weight))
                if conv.bias is not None:
                    conv.bias.zero_()
    return module


@register_layer("convnn_attention", kind="tokens")
class ConvNNAttention(nn.Module):
    """ConvNN-attention: ``[B, N, D] -> [B, N, D']`` (see the module docstring).

    Options (paper defaults): ``k`` = 9 neighbours; ``similarity`` cosine|dot|euclidean (the paper's
    runs used "dot", the reference's "matmul", ``Q K^T / sqrt(d)``); ``projections`` linear|identity
    for ``w_q, w_k, w_v`` (bias-free ``Linear``; ``proj_dim`` sets the width of Q and K, default D);
    ``rho`` softmax|ones; ``sampling`` all|random|spatial with ``num_candidates`` r (the paper: random,
    r = 32); ``aggregation`` depthwise|separable|standard|sum (:func:`build_aggregation`) with
    ``unit_init`` and ``bias``; ``self_first``: each token is its own first neighbour, then the k - 1
    best other candidates (None = the paper's runs: False with "all", True with random/spatial);
    ``heads``; ``dropout``: attention dropout on the k modulation weights, training mode only.

    Queries always cover all N tokens; with sampled candidates the keys are those of the candidates.
    The self entry forced first by ``self_first`` is scored like any neighbour, ``sim(q_i, k_i)``, so
    with linear projections ``w_k`` then runs on all N tokens. Without ``self_first`` (or with identity
    projections) only the r candidates go through ``w_k``, which is what the paper's GFLOPs count
    for random r = 32 ("W_q evaluated on the r candidates only": the reference names its key-side
    projection W_q, and gives the self entry a constant logit 1 instead of its similarity).

    Parameters for D = D' = 192, k = 9: projections ``4 D^2`` = 147,456 plus the aggregation:
    depthwise 1,728 (ViT-Tiny 5,500,042, "5.500M"), separable 38,592 (5,942,410, "5.942M"), standard
    331,776 (9,460,618, "9.460M"), sum 0 (KVT, 5,479,306).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        k: int = 9,
        similarity: str = "dot",
        projections: str = "linear",
        proj_dim: int | None = None,
        rho: str = "softmax",
        sampling: str = "all",
        num_candidates: int | None = None,
        aggregation: str = "depthwise",
        unit_init: bool = True,
        bias: bool = False,
        self_first: bool | None = None,
        heads: int = 1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        check_positive("k", k)
        check_positive("heads", heads)
        check_heads(in_channels, heads)
        check_choice("similarity", similarity, ("cosine", "dot", "euclidean"))
        check_choice("projections", projections, PROJECTIONS)
        check_choice("rho", rho, ("ones", "softmax"))
        check_dropout(dropout)
        self.sampler = CandidateSampler(sampling, num_candidates)
        if num_candidates is not None and k > num_candidates:
            raise ValueError(f"k={k} neighbours exceed num_candidates={num_candidates}; need k <= r")
        qk_dim = in_channels if proj_dim is None else proj_dim
        if projections == "identity" and proj_dim not in (None, in_channels):
            raise ValueError(f"proj_dim={proj_dim} needs projections='linear' (identity keeps {in_channels})")
        check_positive("proj_dim", qk_dim)
        check_heads(qk_dim, heads)
        self.k = k
        self.similarity = similarity
        self.rho = rho
        self.self_first = sampling != "all" if self_first is None else self_first
        self.heads = heads
        self.dropout = dropout
        linear = projections == "linear"
        self.w_q = nn.Linear(in_channels, qk_dim, bias=False) if linear else nn.Identity()
        self.w_k = nn.Linear(in_channels, qk_dim, bias=False) if linear else nn.Identity()
        self.w_v = nn.Linear(in_channels, in_channels, bias=False) if linear else nn.Identity()
        self._own_keys = self.self_first and linear
        self.aggregate = build_aggregation(in_channels, k, aggregation, bias, unit_init)
        self.w_o = nn.Linear(in_channels, out_channels, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, N, D] -> [B, N, D']``."""
        b, n, _ = x.shape
        candidates = self.sampler.candidates(n, device=x.device)
        q = self._fold(self.w_q(x))
        v = self._fold(self.w_v(x)).transpose(1, 2)  # [B*H, d, N]
        self_sim = None
        if candidates is None or not self._own_keys:
            k = self._fold(self.w_k(x if candidates is None else x[:, candidates]))
        else:
            own = self._fold(self.w_k(x))
            self_sim = pair_similarity(q, own, self.similarity)
            k = own[:, candidates]
        values, indices = knn_select(
            q,
            k,
            self.k,
            kind=self.similarity,
            candidates=candidates,
            self_first=self.self_first,
            self_sim=self_sim,
        )
        rows = modulate(gather_neighbors(v, indices), values, self.rho)  # [B*H, d, N*k]
        if self.training and self.dropout > 0:
            rows = rows * F.dropout(rows.new_ones(rows.shape[0], 1, rows.shape[2]), self.dropout)
        out = self.aggregate(rows.reshape(b, -1, n * self.k))  # [B, D, N]
        return self.w_o(out.transpose(1, 2))

    def _fold(self, t: Tensor) -> Tensor:
        """``[B, L, H*d] -> [B*H, L, d]``: heads into the batch."""
        heads = split_heads(t, self.heads)
        return heads.reshape(-1, heads.shape[2], heads.shape[3])


@register_layer("kvt_attention", kind="tokens")
def kvt_attention(
    in_channels: int, out_channels: int, k: int = 9, heads: int = 1, dropout: float = 0.1
) -> ConvNNAttention:
    """KVT (Wang et al.): ``softmax`` over each query's top-k scores ``Q K^T / sqrt(d)``, times V, then
    ``w_o``. ``[B, N, D] -> [B, N, D']``.

    Built on the k-NN core as ConvNN-attention with dot similarity, softmax rho, no forced self
    neighbour, all candidates and the parameter-free "sum" aggregation: ``4 D^2`` parameters, as
    attention (ViT-Tiny 5,479,306). Selection uses top-k indices, so exactly k keys take part even
    when scores tie.
    """
    return ConvNNAttention(
        in_channels,
        out_channels,
        k=k,
        similarity="dot",
        rho="softmax",
        aggregation="sum",
        self_first=False,
        heads=heads,
        dropout=dropout,
    )
