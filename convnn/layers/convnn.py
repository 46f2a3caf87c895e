"""ConvNN on feature maps ``[B, C, H, W]``: k-NN selection over the map's tokens, Conv1d aggregation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from convnn.knn import (
    RHOS,
    SIMILARITIES,
    CandidateSampler,
    aggregate_neighbors,
    check_choice,
    knn_select,
    native,
    nearest_by_place,
    pair_similarity,
)
from convnn.layers.position import (
    append_coordinates,
    coordinate_channels,
    mix_position,
    patch_layers,
    pixel_coordinates,
)
from convnn.layers.registry import register_layer

SELECT_BY = ("features", "position", "both")
PROJECTIONS = ("identity", "linear")
AGGREGATIONS = ("standard", "depthwise", "separable")


def freeze_selection(*projections: nn.Module) -> None:
    """Freeze the query / key projections of a layer whose similarities only select (``rho="ones"``):
    the hard top-k passes them no gradient, so they keep their initial values either way; frozen,
    ``trainable_params`` counts what trains and DDP (which expects a gradient for every trainable
    parameter) does not stop at the second step."""
    for projection in projections:
        projection.requires_grad_(False)


def _projection(channels: int, dim: int, linear: bool) -> nn.Module:
    """A bias-free 1x1 Conv1d ``[B, channels, N] -> [B, dim, N]``, or ``nn.Identity``."""
    return nn.Conv1d(channels, dim, kernel_size=1, bias=False) if linear else nn.Identity()


@register_layer("convnn", kind="map")
class ConvNN(nn.Module):
    """Convolutional Nearest Neighbors on a map: ``[B, C, H, W] -> [B, C', H, W]``.

    Per forward: optional PixelUnshuffle (``patch``), zero ``padding``, flatten to N tokens; choose
    each token's k neighbours among the candidates (``sampling``) by ``similarity`` of ``w_q`` / ``w_k``
    projections of the features (``select_by="features"``), of features mixed with coordinate
    channels (``"both"``, mix ``position_weight``), or by pixel distance (``"position"``, neighbours
    then sorted into raster order: with k = 9, padding 1 this is a 3x3 convolution); gather the
    neighbours' ``w_v`` values (plus coordinate channels when ``aggregate_position``), scale them by
    ``rho`` of their similarities, aggregate with ``aggregate = Conv1d(kernel k, stride k)``; crop the
    padding, PixelShuffle back. With ``rho="ones"`` linear ``w_q`` / ``w_k`` only select (the hard
    top-k passes no gradient): they stay fixed random projections (:func:`freeze_selection`).

    As in the reference, every padded token takes part in the similarity (so the paper's profiler
    FLOPs are reproduced), but only the H * W unpadded tokens are gathered and aggregated. Defaults
    are the paper's VGG setting.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        k: int = 9,
        similarity: str = "cosine",
        projections: str = "identity",
        proj_dim: int | None = None,
        rho: str = "ones",
        sampling: str = "all",
        num_candidates: int | None = None,
        fallback_to_all: bool = False,
        select_by: str = "features",
        aggregate_position: bool = False,
        position_weight: float = 0.5,
        patch: int = 1,
        padding: int = 1,
        aggregation: str = "standard",
        unit_init: bool = False,
        bias: bool = True,
        self_first: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        check_choice("similarity", similarity, SIMILARITIES)
        check_choice("projections", projections, PROJECTIONS)
        check_choice("rho", rho, RHOS)
        check_choice("select_by", select_by, SELECT_BY)
        check_choice("aggregation", aggregation, AGGREGATIONS)
        if k < 1:
            raise ValueError(f"k must be a positive integer, got {k}")
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        if not 0.0 <= position_weight <= 1.0:
            raise ValueError(f"position_weight must lie in [0, 1], got {position_weight}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
        linear = projections == "linear"
        if proj_dim is not None and (not linear or proj_dim < 1):
            raise ValueError(f"proj_dim={proj_dim} needs projections='linear' and a positive value")
        if linear and select_by == "position":
            raise ValueError(
                "projections='linear' needs select_by 'features' or 'both' ('position' has no features)"
            )
        self.sampler = CandidateSampler(sampling, num_candidates, fallback_to_all)
        self.unshuffle, self.shuffle = patch_layers(patch)
        channels, out_total = in_channels * patch**2, out_channels * patch**2
        select_channels = channels + 2 if select_by == "both" else channels
        value_channels = channels + 2 if aggregate_position else channels
        self.w_q = _projection(select_channels, proj_dim or select_channels, linear)
        self.w_k = _projection(select_channels, proj_dim or select_channels, linear)
        if linear and rho == "ones":
            freeze_selection(self.w_q, self.w_k)
        self.w_v = _projection(value_channels, value_channels, linear)
        self.aggregate, self.pointwise = _aggregation(value_channels, out_total, k, aggregation, bias)
        if unit_init:
            nn.init.ones_(self.aggregate.weight)
            if self.aggregate.bias is not None:
                nn.init.zeros_(self.aggregate.bias)
        self.k, self.similarity, self.rho, self.select_by = k, similarity, rho, select_by
        self.aggregate_position, self.position_weight = aggregate_position, position_weight
        self.padding, self.self_first, self.chunk_size, self.patch = padding, self_first, chunk_size, patch
        self._uses_coordinates = aggregate_position or select_by == "both"

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, C', H, W]``."""
        if x.shape[-2] % self.patch or x.shape[-1] % self.patch:
            raise ValueError(
                f"convnn patch={self.patch} needs H and W divisible by it, got {tuple(x.shape[-2:])}"
            )
        x = self.unshuffle(x)
        pad = self.padding
        height, width = x.shape[-2] + 2 * pad, x.shape[-1] + 2 * pad
        # the padded map's token rows [B, N, C] in one copy: the layout the selection and the gathers
        # read, so neither transposes the map again; ``tokens`` is its [B, C, N] view
        rows = padded_rows(x, pad)
        tokens = rows.reshape(x.shape[0], height * width, -1).transpose(1, 2)
        if not isinstance(self.w_v, nn.Identity):  # a 1x1 Conv1d reads [B, C, N] ~6x faster contiguous
            tokens = tokens.contiguous()
        coords = coordinate_channels(height, width, tokens) if self._uses_coordinates else None
        candidates = self.sampler.candidates(
            height * width, grid=(height, width), device=x.device, padding=pad
        )
        self._check_candidates(height, width, candidates)
        values_in = append_coordinates(tokens, coords) if self.aggregate_position else tokens
        v = self.w_v(values_in)
        real_only = torch.is_grad_enabled() and not torch.jit.is_tracing()  # training: unpadded queries
        with torch.set_grad_enabled(real_only and self.rho == "softmax"):
            if self.select_by == "position":
                sims, idx = self._select_by_position(x.shape[0], height, width, candidates)
                sims, idx = self._crop(sims, height, width), self._crop(idx, height, width)
            else:
                if self.select_by == "both":
                    tokens = mix_position(tokens, coords, self.position_weight)
                sims, idx = self._select_by_features(tokens, candidates, height, width, real_only)
        out = self.pointwise(aggregate_neighbors(v, idx, sims, self.rho, self.aggregate))
        return self.shuffle(out.unflatten(2, (height - 2 * pad, width - 2 * pad)))

    def _select_by_position(
        self, batch: int, height: int, width: int, candidates: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """The k nearest candidates in pixel distance, in raster order -> ``(values, indices) [B, N, k]``."""
        place = pixel_coordinates(height, width, self.aggregate.weight.device)
        sims, idx = nearest_by_place(
            place, self.k, candidates=candidates, self_first=self.self_first, chunk_size=self.chunk_size
        )
        return sims.expand(batch, -1, -1), idx.expand(batch, -1, -1)

    def _crop(self, per_token: Tensor, height: int, width: int) -> Tensor:
        """Keep the rows of the unpadded tokens: ``[B, Hp * Wp, k] -> [B, H * W, k]``."""
        pad = self.padding
        grid = per_token.unflatten(1, (height, width))[:, pad : height - pad, pad : width - pad]
        return grid.flatten(1, 2)

    def _select_by_features(
        self, selection: Tensor, candidates: Tensor | None, height: int, width: int, real_only: bool
    ) -> tuple[Tensor, Tensor]:
        """k-NN of the unpadded tokens among the candidates of the padded ``height x width`` map
        ``selection [B, C, N]`` through ``w_q`` / ``w_k`` -> ``(values, indices) [B, H * W, k]``.

        ``real_only`` (training: the layer's input needs gradients, whatever ``rho``): only the
        unpadded tokens query. Otherwise (evaluation, FLOP profiling) every padded token queries too
        and its rows are cropped, as in the reference, so the paper's profiler GFLOPs are reproduced;
        the kept rows are the same.
        """
        pad = self.padding
        real = None
        if real_only:
            grid = torch.arange(height * width, device=selection.device).view(height, width)
            real = grid[pad : height - pad, pad : width - pad].flatten()
        q = self.w_q(selection).transpose(1, 2)
        separate_keys = not isinstance(self.w_k, nn.Identity)
        if candidates is None and not separate_keys:  # identity keys are the queries
            keys = q
        else:
            keys = self.w_k(selection if candidates is None else selection[:, :, candidates]).transpose(1, 2)
        # = q[:, real], a strided copy; identity keys: knn_select takes it from the rows it normalised
        queries = q if real is None or keys is q else self._crop(q, height, width)
        self_sim = None
        if self.self_first and candidates is not None and separate_keys and self.rho == "softmax":
            own_keys = self.w_k(selection if real is None else selection[:, :, real]).transpose(1, 2)
            self_sim = pair_similarity(queries, own_keys, self.similarity)
        sims, idx = knn_select(
            queries,
            keys,
            self.k,
            kind=self.similarity,
            candidates=candidates,
            self_first=self.self_first,
            self_sim=self_sim,
            chunk_size=self.chunk_size,
            queries=real,
        )
        if real is None:
            sims, idx = self._crop(sims, height, width), self._crop(idx, height, width)
        return sims, idx

    def _check_candidates(self, height: int, width: int, candidates: Tensor | None) -> None:
        """Raise a clear ``ValueError`` when the map offers fewer than k candidate tokens."""
        available = height * width if candidates is None else candidates.numel()
        if self.k > available:
            raise ValueError(
                f"convnn k={self.k} exceeds the {available} candidate tokens of the padded "
                f"{height}x{width} map (sampling={self.sampler.sampling!r}, padding={self.padding})"
            )


def padded_rows(x: Tensor, pad: int) -> Tensor:
    """The token rows of ``x [B, C, H, W]`` zero-padded by ``pad`` -> ``[B, H + 2 pad, W + 2 pad, C]``.

    Only the border is zeroed and the map copied in, on CPU by the native kernels' blocked transposes
    (about 4x torch's strided copy; its gradient the same way back), else by a strided copy (half the
    time of ``F.pad`` on the permuted map, which fills the whole output first); a custom op, so
    ``torch.compile`` runs the same code (inductor's fused pad-and-transpose ran about 2x slower).
    ``pad = 0``: a channels-last view.
    """
    return _padded_rows(x, pad) if pad else x.permute(0, 2, 3, 1)


def _transposes(x: Tensor) -> bool:
    """Whether the native transposes make ``x``'s padded rows: an NCHW-contiguous map they serve. A
    channels-last map (every map after a ConvNN layer, BatchNorm and pooling) already holds its rows
    contiguously: the strided copy moves whole rows and is the faster one there."""
    return native.serves(x) and x.is_contiguous()


@torch.library.custom_op("convnn::padded_rows", mutates_args=(), schema="(Tensor x, int pad) -> Tensor")
def _padded_rows(x: Tensor, pad: int) -> Tensor:
    if _transposes(x):
        return torch.ops.convnn_native.padded_rows(x, pad)
    rows = x.permute(0, 2, 3, 1)
    batch, height, width, channels = rows.shape
    out = x.new_empty(batch, height + 2 * pad, width + 2 * pad, channels)
    out[:, :pad].zero_()
    out[:, height + pad :].zero_()
    out[:, pad : height + pad, :pad].zero_()
    out[:, pad : height + pad, width + pad :].zero_()
    out[:, pad : height + pad, pad : width + pad] = rows
    return out


@_padded_rows.register_fake
def _padded_rows_fake(x: Tensor, pad: int) -> Tensor:
    batch, channels, height, width = x.shape
    return x.new_empty(batch, height + 2 * pad, width + 2 * pad, channels)


def _padded_rows_grad(ctx, grad: Tensor) -> tuple[Tensor, None]:
    """The map's gradient ``[B, C, H, W]`` in the map's layout: contiguous from the native transposes
    (an NCHW map), else a channels-last view."""
    pad = ctx.pad
    if ctx.transposed and native.serves(grad):
        return torch.ops.convnn_native.cropped_map(grad, pad), None
    return grad[:, pad : grad.shape[1] - pad, pad : grad.shape[2] - pad].permute(0, 3, 1, 2), None


def _padded_rows_setup(ctx, inputs: tuple, output: Tensor) -> None:
    ctx.transposed, ctx.pad = _transposes(inputs[0]), inputs[1]


_padded_rows.register_autograd(_padded_rows_grad, setup_context=_padded_rows_setup)


def _aggregation(
    channels: int, out_channels: int, k: int, kind: str, bias: bool
) -> tuple[nn.Conv1d, nn.Module]:
    """``(aggregate, pointwise)``: the Conv1d(kernel k, stride k) and the separable 1x1 (else Identity).

    standard: Conv1d(C, C'); depthwise: groups = C (C' a multiple of C); separable: depthwise
    Conv1d(C, C, groups=C, no bias) then a 1x1 Conv1d(C, C').
    """
    if kind == "standard":
        return nn.Conv1d(channels, out_channels, k, stride=k, bias=bias), nn.Identity()
    if kind == "depthwise":
        if out_channels % channels:
            raise ValueError(
                f"depthwise aggregation needs output channels ({out_channels}) to be a multiple of the "
                f"aggregated channels ({channels})"
            )
        return nn.Conv1d(channels, out_channels, k, stride=k, groups=channels, bias=bias), nn.Identity()
    depthwise = nn.Conv1d(channels, channels, k, stride=k, groups=channels, bias=False)
    return depthwise, nn.Conv1d(channels, out_channels, 1, bias=bias)
