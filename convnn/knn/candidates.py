"""Which tokens are candidate neighbours (stage 2 of the k-NN core): all, random r or a spatial grid.

Candidates are made on the input's device without a host round trip: random ones drawn there,
spatial ones built there once per shape and device and cached.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from convnn.knn.similarity import check_choice

SAMPLINGS = ("all", "random", "spatial")


def random_candidates(
    n: int, r: int, generator: torch.Generator | None = None, device: torch.device | None = None
) -> Tensor:
    """``r`` distinct token indices drawn uniformly from ``range(n)`` -> LongTensor ``[r]`` on ``device``.

    Drawn on ``device`` itself (the ``r`` largest of ``n`` uniform keys: no host round trip, no sync,
    capturable by CUDA graphs and ``torch.compile``), from ``generator`` (on that device) when given,
    else from the global RNG.
    """
    if not 1 <= r <= n:
        raise ValueError(f"random sampling needs 1 <= num_candidates <= N tokens, got r={r}, N={n}")
    keys = (
        torch.rand(n, device=device)
        if generator is None
        else torch.rand(n, generator=generator, device=device)
    )
    return keys.topk(r).indices


def spatial_candidates(
    n: int,
    r: int,
    grid: tuple[int, int] | None = None,
    padding: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """A regular candidate set -> LongTensor ``[M]`` of token indices on ``device`` (CPU when None), as
    the reference builds it.

    Sequences (``grid`` None): ``linspace(0, n - 1, r)`` truncated to int (``M = r``; for n = 197,
    r = 32: 0, 6, 12, 18, 25, ..., 196). Maps (``grid = (H, W)`` of the map the tokens come from,
    ``padding`` included on every side): a ``g x g`` grid with ``g = floor(sqrt(r))`` over the real
    pixels only, rows ``padding + linspace(0, H - 1 - 2 padding, g)`` and columns alike, truncated,
    indices ``row * W + col`` (``M = g * g``). A grid with more rows or columns than the real map
    raises (see :class:`CandidateSampler`'s ``fallback_to_all``). Built on ``device`` itself (no host
    tensor, no copy): see :func:`linspace_trunc`.
    """
    if grid is None:
        if not 1 <= r <= n:
            raise ValueError(f"spatial sampling needs 1 <= num_candidates <= N tokens, got r={r}, N={n}")
        return linspace_trunc(n - 1, r, device)
    height, width = grid
    if height * width != n:
        raise ValueError(f"grid {grid} does not hold the {n} tokens")
    g = math.isqrt(r)
    if g < 1:
        raise ValueError(f"spatial sampling needs num_candidates >= 1, got r={r}")
    real_h, real_w = height - 2 * padding, width - 2 * padding
    if g > min(real_h, real_w):
        raise ValueError(
            f"a {g}x{g} spatial grid (num_candidates={r}) exceeds the {real_h}x{real_w} map; "
            "set fallback_to_all=true to use all candidates on such maps"
        )
    rows = linspace_trunc(real_h - 1, g, device) + padding
    cols = linspace_trunc(real_w - 1, g, device) + padding
    return (rows[:, None] * width + cols[None, :]).flatten()


def linspace_trunc(end: int, steps: int, device: torch.device | str | None = None) -> Tensor:
    """``torch.linspace(0, end, steps, dtype=torch.float64).long()`` computed on ``device`` -> LongTensor
    ``[steps]``, the same on every device.

    torch's own formula in float64, one rounding per op: ``i * step`` for the first ``steps // 2``
    entries, ``end - (steps - 1 - i) * step`` for the rest (``step = end / (steps - 1)``), then
    truncated. CUDA's linspace kernel may fuse that multiply-subtract (one rounding instead of two,
    which can move an entry that should be an integer to just below it); the CPU's vectorised kernel
    rounds differently in a few shapes (``end`` a power of two) and by instruction set.
    """
    if steps == 1:
        return torch.zeros(1, dtype=torch.long, device=device)
    step, half = end / (steps - 1), steps // 2
    first = torch.arange(half, dtype=torch.float64, device=device) * step
    rest = torch.arange(steps - 1 - half, -1, -1, dtype=torch.float64, device=device) * step
    return torch.cat([first, rest.neg_().add_(end)]).long()


def fits(sampling: str, n: int, r: int, grid: tuple[int, int] | None, padding: int) -> bool:
    """Whether ``r`` random candidates (``r <= n``) or a spatial ``floor(sqrt(r))`` grid (a sequence:
    ``r <= n``; a map: the grid's side <= the real map's height and width) fit the ``n`` tokens."""
    if sampling == "random" or grid is None:
        return r <= n
    return math.isqrt(r) <= min(grid) - 2 * padding


class CandidateSampler(nn.Module):
    """Which tokens are candidate neighbours: "all", "random" (``num_candidates`` r) or "spatial".

    ``num_candidates`` is required for "random" / "spatial" and ignored by "all" (so a sweep over
    ``sampling`` can keep one r). A map's spatial grid is ``floor(sqrt(r)) x floor(sqrt(r))``, so the
    paper's Figure 5 "r" (r^2 random candidates or an r x r grid) is ``num_candidates = r^2``.

    ``fallback_to_all``: when r exceeds the tokens (random) or the grid's side exceeds the real map's
    (spatial), use all candidates (each token its own first neighbour) instead of raising, as the
    paper's Figure 5 runs did on VGG-11's small late-stage maps. Off by default: never silent.

    Candidates are made on the input's device without a host round trip: random ones drawn there, in
    training mode from the global RNG (reproducible through ``seed_everything``), in eval mode from
    this module's own generator for that device (:meth:`generator_for`), which :func:`reset_sampling`
    re-seeds at the start of every validation / test epoch; spatial ones built once per map shape and
    device and cached.
    """

    def __init__(
        self, sampling: str = "all", num_candidates: int | None = None, fallback_to_all: bool = False
    ) -> None:
        super().__init__()
        check_choice("sampling", sampling, SAMPLINGS)
        if sampling != "all" and (num_candidates is None or num_candidates < 1):
            raise ValueError(f"sampling={sampling!r} needs a positive num_candidates, got {num_candidates}")
        self.sampling = sampling
        self.num_candidates = num_candidates
        self.fallback_to_all = fallback_to_all
        self.seed = 0
        self._generators: dict[torch.device, torch.Generator] = {}
        self._spatial: dict[tuple, Tensor] = {}

    def reseed(self, seed: int) -> None:
        """Restart the evaluation draws from ``seed`` on every device."""
        self.seed = seed
        self._generators.clear()

    def generator_for(self, device: torch.device) -> torch.Generator:
        """This sampler's evaluation generator on ``device``, seeded with :attr:`seed` when first used."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(self.seed)
        return self._generators[device]

    def candidates(
        self,
        n: int,
        grid: tuple[int, int] | None = None,
        device: torch.device | None = None,
        padding: int = 0,
    ) -> Tensor | None:
        """Candidate token indices for ``n`` tokens: None for all, else LongTensor ``[M]`` on ``device``.

        ``grid = (H, W)`` marks the tokens as a map (``padding`` zero rows / columns on every side,
        left out of the spatial grid); None = a sequence.
        """
        if self.sampling == "all":
            return None
        if self.fallback_to_all and not fits(self.sampling, n, self.num_candidates, grid, padding):
            return None
        device = torch.device(device or "cpu")
        if self.sampling == "random":
            generator = None if self.training else self.generator_for(device)
            return random_candidates(n, self.num_candidates, generator, device)
        key = (n, grid, padding, device)
        if torch.compiler.is_compiling():  # a constant of the compiled graph
            return spatial_candidates(n, self.num_candidates, grid, padding, device)
        if key not in self._spatial:
            self._spatial[key] = spatial_candidates(n, self.num_candidates, grid, padding, device)
        return self._spatial[key]

    def extra_repr(self) -> str:
        fallback = ", fallback_to_all=True" if self.fallback_to_all else ""
        return f"sampling={self.sampling!r}, num_candidates={self.num_candidates}{fallback}"


def reset_sampling(model: nn.Module, seed: int) -> int:
    """Re-seed every :class:`CandidateSampler` in ``model``; returns how many there are.

    The i-th sampler (in ``model.modules()`` order) gets seed ``seed * 100003 + i``, so evaluation
    with random candidates is the same whenever it starts from the same ``seed``.
    """
    samplers = [m for m in model.modules() if isinstance(m, CandidateSampler)]
    for index, sampler in enumerate(samplers):
        sampler.reseed((seed * 100003 + index) % (1 << 63))
    return len(samplers)
