"""ConvNN-attention for ViT slots (tokens ``[B, N, D]``) and KVT, both on the k-NN core ``convnn.knn``.

Per head: queries ``Q = w_q(x)`` of all N tokens, keys ``K = w_k(x_c)`` of the candidate tokens
``c`` (of all tokens when a forced self neighbour needs its own key), values ``V = w_v(x)``; every
token keeps its k best candidates by similarity
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
    RHOS,
    SIMILARITIES,
    CandidateSampler,
    check_choice,
    flat_indices,
    gather_neighbors,
    gather_scaled_sum,
    grouped_matmul,
    knn_select,
    nearest_by_place,
    pair_similarity,
    steps_apply,
    token_rows,
)
from convnn.layers.attention import check_dropout, check_heads, check_positive, split_heads
from convnn.layers.convnn import freeze_selection
from convnn.layers.position import mix_position
from convnn.layers.registry import register_layer

AGGREGATIONS = ("standard", "depthwise", "separable", "sum")
PROJECTIONS = ("linear", "identity")
SELECT_BY = ("features", "position", "both")
DROPOUT_ON = ("weights", "output")
#: Sequences up to this length aggregate a "sum" (KVT) in training as one dense product
#: (:meth:`ConvNNAttention._dense_sum`); longer ones gather the k rows of every token.
DENSE_SUM_TOKENS = 1024


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
    ``rho`` softmax|ones (with "ones" linear ``w_q`` / ``w_k`` only select and are frozen:
    :func:`~convnn.layers.convnn.freeze_selection`); ``sampling`` all|random|spatial with
    ``num_candidates`` r (the paper: random, r = 32); ``aggregation``
    depthwise|separable|standard|sum (:func:`build_aggregation`) with ``unit_init`` and ``bias``;
    ``self_first``: each token is its own first neighbour, then the k - 1 best other candidates
    (None = the paper's runs: False with "all", True with random/spatial);
    ``self_logit``: None scores the forced self neighbour by its similarity; a number gives it that
    constant score (the reference: 1.0, prepended to the k - 1 selected scores before the softmax);
    ``heads``; ``dropout`` (training mode only) on the k modulation weights (``dropout_on="weights"``,
    attention dropout) or on the aggregated output before ``w_o`` (``"output"``, the reference);
    ``select_by``: "features" (Q, K from the tokens), "both" (from the tokens mixed with a position
    channel ``linspace(-1, 1, N)``, weight ``position_weight`` on the features, as the map layer does
    with its coordinate channels) or "position" (the k tokens nearest in index, in sequence order,
    identity projections only: with k odd, rho "ones" and sampling "all" each interior token sees
    the window ``i - k//2 .. i + k//2``, a 1-D convolution of V); ``chunk_size`` bounds the
    similarity memory (:func:`convnn.knn.knn_select`).

    Queries always cover all N tokens; with sampled candidates the keys are those of the candidates.
    The self entry forced first by ``self_first`` is scored like any neighbour, ``sim(q_i, k_i)``, so
    with linear projections ``w_k`` then runs on all N tokens. With ``self_logit`` set, without
    ``self_first`` or with identity projections only the r candidates go through ``w_k``, which is what
    the paper's GFLOPs count for random r = 32 ("W_q evaluated on the r candidates only": the reference
    names its key-side projection W_q, and gives the self entry a constant logit 1).

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
        select_by: str = "features",
        position_weight: float = 0.5,
        aggregation: str = "depthwise",
        unit_init: bool = True,
        bias: bool = False,
        self_first: bool | None = None,
        self_logit: float | None = None,
        heads: int = 1,
        dropout: float = 0.1,
        dropout_on: str = "weights",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        check_positive("k", k)
        check_positive("heads", heads)
        check_heads(in_channels, heads)
        check_choice("similarity", similarity, SIMILARITIES)
        check_choice("projections", projections, PROJECTIONS)
        check_choice("rho", rho, RHOS)
        check_choice("select_by", select_by, SELECT_BY)
        check_dropout(dropout)
        check_choice("dropout_on", dropout_on, DROPOUT_ON)
        self.sampler = CandidateSampler(sampling, num_candidates)
        if num_candidates is not None and k > num_candidates:
            raise ValueError(f"k={k} neighbours exceed num_candidates={num_candidates}; need k <= r")
        if not 0.0 <= position_weight <= 1.0:
            raise ValueError(f"position_weight={position_weight} must lie in [0, 1]")
        if chunk_size is not None:
            check_positive("chunk_size", chunk_size)
        linear = projections == "linear"
        if linear and select_by == "position":
            raise ValueError("select_by='position' ignores the features: it needs projections='identity'")
        if not linear and proj_dim is not None:
            raise ValueError(f"proj_dim={proj_dim} needs projections='linear'")
        select_dim = in_channels + 1 if select_by == "both" else in_channels
        qk_dim = (proj_dim or in_channels) if linear else select_dim
        check_positive("proj_dim", qk_dim)
        if select_by != "position":
            check_heads(qk_dim, heads)
        self.k, self.similarity, self.rho, self.heads, self.dropout = k, similarity, rho, heads, dropout
        self.select_by, self.position_weight, self.chunk_size = select_by, position_weight, chunk_size
        self.self_first = sampling != "all" if self_first is None else self_first
        if self_logit is not None and not self.self_first:
            raise ValueError(
                f"self_logit={self_logit} scores the forced self neighbour: it needs self_first=true "
                "(or null with sampling random / spatial)"
            )
        if self_logit is not None and (rho != "softmax" or select_by == "position"):
            raise ValueError(
                f"self_logit={self_logit} needs rho='softmax' and select_by 'features' or 'both'"
            )
        self.self_logit, self.dropout_on = self_logit, dropout_on
        self.w_q = nn.Linear(select_dim, qk_dim, bias=False) if linear else nn.Identity()
        self.w_k = nn.Linear(select_dim, qk_dim, bias=False) if linear else nn.Identity()
        if linear and rho == "ones":
            freeze_selection(self.w_q, self.w_k)
        self.w_v = nn.Linear(in_channels, in_channels, bias=False) if linear else nn.Identity()
        self._own_keys = self.self_first and linear and self_logit is None
        self.aggregate = build_aggregation(in_channels, k, aggregation, bias, unit_init)
        self.w_o = nn.Linear(in_channels, out_channels, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, N, D] -> [B, N, D']``."""
        b, n, _ = x.shape
        candidates = self.sampler.candidates(n, device=x.device)
        if self.select_by == "position":
            values, indices = self._select_by_position(n, candidates, x.device)
            values, indices = values.expand(b * self.heads, -1, -1), indices.expand(b * self.heads, -1, -1)
        else:
            values, indices = self._select_by_features(self._selection(x), candidates)
        v = self._fold(self.w_v(x))  # [B*H, N, d]
        weights = values.softmax(dim=-1).to(v.dtype) if self.rho == "softmax" else None  # [B*H, N, k]
        dropping = self.training and self.dropout > 0
        if dropping and self.dropout_on == "weights":
            mask = F.dropout(v.new_ones(indices.shape), self.dropout)
            weights = mask if weights is None else weights * mask
        if torch.is_grad_enabled() and not torch.jit.is_tracing():
            if isinstance(self.aggregate, NeighborSum) and n <= DENSE_SUM_TOKENS:
                out = self._dense_sum(v, indices, weights, b)
            else:
                out = self._aggregate_rows(v, indices, weights, b)  # [B, N, D]
        else:  # the Conv1d ops, as profilers and FLOP counters see them (same values)
            rows = gather_neighbors(v.transpose(1, 2), indices)  # [B*H, d, N*k]
            if weights is not None:
                rows = rows * weights.reshape(rows.shape[0], 1, -1)
            out = self.aggregate(rows.reshape(b, -1, n * self.k)).transpose(1, 2)
        if dropping and self.dropout_on == "output":  # the mask drawn over [B, D, N], as the reference
            out = F.dropout(out.transpose(1, 2).contiguous(), self.dropout).transpose(1, 2)
        return self.w_o(out)

    def _dense_sum(self, v: Tensor, indices: Tensor, weights: Tensor | None, batch: int) -> Tensor:
        """The "sum" aggregation as one product: ``v [B*H, N, d]``, ``indices`` / ``weights [B*H, N, k]``
        -> ``[B, N, D]``. Each token's k weights are scattered into its row of a ``[B*H, N, N]`` matrix
        (a row's indices are distinct, so a plain ``scatter``: no atomics) that multiplies ``v``; for
        ViT-length sequences one batched GEMM beats gathering k rows per token."""
        bh, n, d = v.shape
        weights = v.new_ones(indices.shape) if weights is None else weights
        out = v.new_zeros(bh, n, n).scatter(2, indices, weights) @ v
        return out.view(batch, bh // batch, n, d).transpose(1, 2).reshape(batch, n, -1)

    def _aggregate_rows(self, v: Tensor, indices: Tensor, weights: Tensor | None, batch: int) -> Tensor:
        """``aggregate`` on token-major rows of ``v [B*H, N, d]`` at ``indices [B*H, N, k]``,
        ``weights [B*H, N, k]`` or None -> ``[B, N, D]``.

        Equal to the Conv1d path of :meth:`forward` but without channel-first copies: the depthwise
        weights scale the gathered rows, one batched ``[1, k] @ [k, d]`` product per token weights and
        sums them (on CPU with one head, :func:`gather_scaled_sum` in cache-sized steps without the
        gathered rows), the separable pointwise conv is a ``linear``; a standard aggregation is one
        einsum.
        """
        first = self.aggregate[0] if isinstance(self.aggregate, nn.Sequential) else self.aggregate
        bh, n, d = v.shape
        heads, k = bh // batch, indices.shape[-1]
        depthwise = isinstance(first, nn.Conv1d) and first.groups == first.out_channels == d
        if heads == 1 and depthwise and steps_apply(v, first.weight):
            flat = flat_indices(indices, n).reshape(-1, k)
            w = v.new_ones(flat.shape) if weights is None else weights.reshape(-1, k)
            out = gather_scaled_sum(v.reshape(-1, d), flat, w, first.weight.view(d, k).t().contiguous())
            return self._aggregate_tail(out.view(batch, n, d), first)
        rows = token_rows(v, indices)  # [B*H, N, k, d]: neighbour j of token i
        if isinstance(first, nn.Conv1d) and first.groups == 1:  # standard
            if weights is not None:
                rows = rows * weights.unsqueeze(-1)
            rows = rows.view(batch, heads, n, k, d).permute(0, 2, 3, 1, 4).reshape(batch * n, k, heads * d)
            out = grouped_matmul(rows, first.weight, 1).view(batch, n, -1)
            return out if first.bias is None else out + first.bias
        if isinstance(first, nn.Conv1d):  # depthwise: channel h * d + i of head h
            scale = first.weight.view(heads, d, k).transpose(1, 2)[None, :, None]  # [1, H, 1, k, d]
            rows = (rows.view(batch, heads, n, k, d) * scale).view(bh, n, k, d)
        out = rows.sum(2) if weights is None else (weights.unsqueeze(-2) @ rows).squeeze(-2)  # [B*H, N, d]
        return self._aggregate_tail(out.view(batch, heads, n, d).transpose(1, 2).reshape(batch, n, -1), first)

    def _aggregate_tail(self, out: Tensor, first: nn.Module) -> Tensor:
        """The depthwise aggregation's bias and the separable pointwise conv on ``out [B, N, D]``."""
        if isinstance(first, nn.Conv1d) and first.bias is not None:
            out = out + first.bias
        if isinstance(self.aggregate, nn.Sequential):  # separable: the 1x1 pointwise conv
            pointwise = self.aggregate[1]
            out = F.linear(out, pointwise.weight.squeeze(-1), pointwise.bias)
        return out

    def _selection(self, x: Tensor) -> Tensor:
        """What Q and K are projected from: ``[B, N, D]``, or ``[B, N, D + 1]`` with the position
        channel ``linspace(-1, 1, N)`` mixed in (``select_by="both"``, :func:`mix_position`)."""
        if self.select_by == "features":
            return x
        place = torch.linspace(-1, 1, x.shape[1], dtype=x.dtype, device=x.device)[None]
        return mix_position(x.transpose(1, 2), place, self.position_weight).transpose(1, 2)

    def _select_by_features(self, sel: Tensor, candidates: Tensor | None) -> tuple[Tensor, Tensor]:
        """k-NN of every token among the candidates through ``w_q`` / ``w_k`` -> ``[B*H, N, k]`` x2."""
        q = self._fold(self.w_q(sel))
        self_sim = None if self.self_logit is None else q.new_full(q.shape[:2], self.self_logit)
        if candidates is None or not self._own_keys:
            k = self._fold(self.w_k(sel if candidates is None else sel[:, candidates]))
        else:
            own = self._fold(self.w_k(sel))
            self_sim = pair_similarity(q, own, self.similarity)
            k = own[:, candidates]
        return knn_select(
            q,
            k,
            self.k,
            kind=self.similarity,
            candidates=candidates,
            self_first=self.self_first,
            self_sim=self_sim,
            chunk_size=self.chunk_size,
        )

    def _select_by_position(
        self, n: int, candidates: Tensor | None, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """The k candidates nearest in token index, in sequence order -> ``[1, N, k]`` x2."""
        place = torch.arange(n, dtype=torch.float32, device=device).reshape(1, n, 1)
        return nearest_by_place(
            place, self.k, candidates=candidates, self_first=self.self_first, chunk_size=self.chunk_size
        )

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
