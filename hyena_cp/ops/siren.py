"""Sinusoidal kernel generators on a fixed coordinate grid: SIREN (one or many frequencies, fixed or
learnable, optionally block-diagonal and FiLM-conditioned per sample) and random Fourier features.

Coordinates: along axis a, the tap at integer offset ``d`` sits at ``t_a = d / (L_a - 1)``, where
``L = L_cache`` is a setting of the generator, not the input's size: the grid step is fixed, a
larger input extends the grid beyond +-1, and a smaller one uses its centre (or, causal, its leading
taps) — so filters are the same function of the offset at every size (``absolute``): decoding and
packed documents see exactly the prefix of the filter. ``L_cache`` is one int or one per axis.

SIREN (Sitzmann et al. 2020) as the continuous-kernel literature uses it:
``h0 = sin(W0 t + b0)``, then ``num_layers - 1`` layers ``h = sin(W h + b)``, then ``k = W_out h + b_out``
(one output per filter group). The frequency ω0 lives in the initialisation, ``W0 ~ U(+-2π ω0 / D)``
(per row with several ω: multi-ω), the hidden and output layers ``U(+-sqrt(6 / fan_in))``, biases 0,
the output layer then scaled by ``sqrt(1 / prod(L_cache))`` so the kernel's sum over taps starts O(1).
``omega_0_per_row`` gives each embedding row its own ω; ``num_blocks`` > 1 makes the weights
block-diagonal at init (off-diagonal blocks scaled by ``off_block_scale``) with one ω per block on a
linear or log schedule; ``learnable_omega`` moves ω into the forward, ``h0 = sin(2π ω0 s ⊙ (W0 t + b0))``,
with a learned scale ``s`` per row clamped to ``[omega_scale_min, omega_scale_max]`` (then ``W0 ~ U(+-1/D)``).
FiLM (``cond_dim``): a small MLP of the per-sample conditioning gives ``(γ, β)`` per hidden layer,
``h <- γ ⊙ h + β`` after each sine (and after the embedding with ``film_after_embedding``): one filter
bank per sample, ``[B, G, *K]``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from hyena_cp.ops.filters import KernelGrid, group_major

__all__ = ["SirenFilter", "RandomFourierFilter", "KernelFiLM", "omega_schedule"]

ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


def _per_axis(value: int | Sequence[int], spatial_dims: int, name: str) -> tuple[int, ...]:
    values = (int(value),) * spatial_dims if isinstance(value, (int, float)) else tuple(int(v) for v in value)
    if len(values) != spatial_dims or min(values) < 2:
        raise ValueError(f"{name}={value!r} must be an int >= 2 or one per spatial axis ({spatial_dims})")
    return values


def omega_schedule(num_blocks: int, omega_min: float, omega_max: float, schedule: str) -> torch.Tensor:
    """ω per block: ``linspace`` or ``logspace`` (``"linear"`` / ``"log"``) from ``omega_min`` to ``omega_max``."""
    if schedule == "linear":
        return torch.linspace(omega_min, omega_max, num_blocks, dtype=torch.float64)
    if schedule == "log":
        return torch.logspace(math.log10(omega_min), math.log10(omega_max), num_blocks, dtype=torch.float64)
    raise ValueError(f"schedule={schedule!r} must be 'linear' or 'log'")


class KernelFiLM(nn.Module):
    """``[γ_1, β_1, ..., γ_n, β_n] = W2 GELU(W1 c + b1) + b2`` for ``n`` layers of width ``width``.
    ``init="identity"`` starts at γ = 1, β = 0 (W2 = 0); ``"small_random"`` draws W2 ~ N(0, init_std)."""

    def __init__(self, cond_dim: int, width: int, num_layers: int, hidden_dim: int = 64, init: str = "identity",
                 init_std: float = 1e-4):
        super().__init__()
        if init not in ("identity", "small_random"):
            raise ValueError(f"film init={init!r} must be 'identity' or 'small_random'")
        self.width, self.num_layers = width, num_layers
        self.mlp = nn.Sequential(nn.Linear(cond_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 2 * num_layers * width))
        with torch.no_grad():
            if init == "identity":
                self.mlp[2].weight.zero_()
            else:
                self.mlp[2].weight.normal_(0.0, init_std)
            self.mlp[2].bias.copy_(torch.cat([torch.ones(width), torch.zeros(width)]).repeat(num_layers))

    def forward(self, c: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``c [B, cond_dim]`` -> per layer ``(γ, β)``, each ``[B, 1, width]`` (broadcast over taps)."""
        out = self.mlp(c).view(c.shape[0], self.num_layers, 2, 1, self.width)
        return [(out[:, i, 0], out[:, i, 1]) for i in range(self.num_layers)]


class _GridGenerator(nn.Module):
    """Shared by the generators on a fixed-step grid: coordinates, size checks, the output layer."""

    absolute = True  # the same function of the offset at every size

    def __init__(self, num_groups: int, spatial_dims: int, L_cache: int | Sequence[int]):
        super().__init__()
        if num_groups < 1 or spatial_dims not in (1, 2, 3):
            raise ValueError(f"needs num_groups >= 1 and spatial_dims in (1, 2, 3); got {num_groups}, {spatial_dims}")
        self.num_groups, self.spatial_dims = num_groups, spatial_dims
        self.L_cache = _per_axis(L_cache, spatial_dims, "L_cache")
        self.max_size = None

    def reference(self, size: Sequence[int]) -> tuple[float, ...]:
        """Divisors of the offsets: ``L_cache - 1`` per axis, whatever the size."""
        if any(n < 1 for n in size):
            raise ValueError(f"grid size {tuple(size)} must be >= 1 along every axis")
        return tuple(float(n - 1) for n in self.L_cache)

    def _wang_scale(self) -> float:
        return math.sqrt(1.0 / math.prod(self.L_cache))

    def _output(self, h: torch.Tensor, groups: slice, grid: KernelGrid) -> torch.Tensor:
        """``h [N, W]`` or ``[B, N, W]`` -> ``[G_sel, *K]`` or ``[B, G_sel, *K]``, computed as
        ``W_out @ h^T`` so the kernel comes out group-major without a transposing copy."""
        return group_major(self.out, groups, h).reshape(*h.shape[:-2], -1, *grid.shape)


class SirenFilter(_GridGenerator):
    """SIREN kernel generator (module docstring): ``forward(grid, groups, conditioning)`` -> ``[G_sel, *K]``,
    or ``[B, G_sel, *K]`` with FiLM conditioning.

    Args:
        num_groups, spatial_dims: set by the Hyena operator (filter groups, axes).
        L_cache: the coordinate grid's extent (taps at ``d / (L_cache - 1)``), int or per axis.
        embedding_dim, hidden_dim, num_layers: widths E and H, and sine layers (embedding included).
        omega_0: ω0 of the embedding; ``omega_0_per_row`` ([E]) gives each row its own (multi-ω).
        num_blocks, omega_0_min, omega_0_max, schedule, off_block_scale: block-diagonal multi-ω.
        learnable_omega, omega_scale_init, omega_scale_min, omega_scale_max: ω in the forward.
        bias: biases of every layer.
        cond_dim, film_hidden_dim, film_init, film_init_std, film_after_embedding: FiLM conditioning.
    """

    def __init__(self, num_groups: int, spatial_dims: int, *, L_cache: int | Sequence[int], embedding_dim: int = 32,
                 hidden_dim: int = 32, num_layers: int = 3, omega_0: float = 10.0,
                 omega_0_per_row: Sequence[float] | None = None, num_blocks: int = 1, omega_0_min: float = 1.0,
                 omega_0_max: float = 12.0, schedule: str = "linear", off_block_scale: float = 0.1,
                 learnable_omega: bool = False, omega_scale_init: float = 1.0, omega_scale_min: float = 1e-2,
                 omega_scale_max: float = 2.0, bias: bool = True, cond_dim: int | None = None,
                 film_hidden_dim: int = 64, film_init: str = "identity", film_init_std: float = 1e-4,
                 film_after_embedding: bool = False):
        super().__init__(num_groups, spatial_dims, L_cache)
        if num_layers < 1 or embedding_dim < 1 or hidden_dim < 1:
            raise ValueError(f"SirenFilter needs num_layers, embedding_dim, hidden_dim >= 1; got {num_layers}, "
                             f"{embedding_dim}, {hidden_dim}")
        if num_blocks > 1 and omega_0_per_row is not None:
            raise ValueError("give either omega_0_per_row or num_blocks > 1 (a block schedule), not both")
        if num_blocks > 1 and any(n % num_blocks for n in (embedding_dim, hidden_dim, num_groups)):
            raise ValueError(f"num_blocks={num_blocks} must divide embedding_dim={embedding_dim}, hidden_dim={hidden_dim} "
                             f"and the output width num_groups={num_groups}")
        if film_after_embedding and embedding_dim != hidden_dim:
            raise ValueError("film_after_embedding needs embedding_dim == hidden_dim (one FiLM width)")
        self.embedding_dim, self.hidden_dim, self.num_layers = embedding_dim, hidden_dim, num_layers
        self.learnable_omega, self.cond_dim, self.film_after_embedding = learnable_omega, cond_dim, film_after_embedding
        self.omega_scale_min, self.omega_scale_max = omega_scale_min, omega_scale_max
        omegas = self._row_omegas(omega_0, omega_0_per_row, num_blocks, omega_0_min, omega_0_max, schedule)
        self.omega_0 = float(omegas.max()) if learnable_omega else float(omega_0)
        self.embedding = nn.Linear(spatial_dims, embedding_dim, bias=bias)
        widths = [embedding_dim] + [hidden_dim] * (num_layers - 1)
        self.hidden = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(widths[:-1], widths[1:]))
        self.out = nn.Linear(widths[-1], num_groups, bias=bias)
        if learnable_omega:
            init = omegas / self.omega_0 if (num_blocks > 1 or omega_0_per_row is not None) else \
                torch.full((embedding_dim,), float(omega_scale_init))
            self.omega_scale = nn.Parameter(init.to(torch.get_default_dtype()))
        self._init_weights(omegas, num_blocks, off_block_scale)
        film_layers = (num_layers - 1) + film_after_embedding
        self.film = None if cond_dim is None else KernelFiLM(cond_dim, hidden_dim, film_layers, film_hidden_dim,
                                                             film_init, film_init_std)

    def _row_omegas(self, omega_0, per_row, num_blocks, omega_min, omega_max, schedule) -> torch.Tensor:
        if per_row is not None:
            omegas = torch.as_tensor(per_row, dtype=torch.float64)
            if omegas.shape != (self.embedding_dim,):
                raise ValueError(f"omega_0_per_row needs embedding_dim={self.embedding_dim} values, got {tuple(omegas.shape)}")
            return omegas
        if num_blocks > 1:
            return omega_schedule(num_blocks, omega_min, omega_max, schedule).repeat_interleave(
                self.embedding_dim // num_blocks)
        return torch.full((self.embedding_dim,), float(omega_0), dtype=torch.float64)

    @torch.no_grad()
    def _init_weights(self, omegas: torch.Tensor, num_blocks: int, off_block_scale: float) -> None:
        d = self.spatial_dims
        bound = (1.0 / d) * torch.ones_like(omegas) if self.learnable_omega else 2 * math.pi * omegas / d
        self.embedding.weight.copy_((torch.rand_like(self.embedding.weight, dtype=torch.float64) * 2 - 1)
                                    * bound[:, None])
        for layer in [*self.hidden, self.out]:
            layer.weight.uniform_(-math.sqrt(6 / layer.in_features), math.sqrt(6 / layer.in_features))
            if num_blocks > 1:
                layer.weight.mul_(_block_mask(layer.out_features, layer.in_features, num_blocks, off_block_scale))
        for layer in [self.embedding, *self.hidden, self.out]:
            if layer.bias is not None:
                layer.bias.zero_()
        self.out.weight.mul_(self._wang_scale())

    def forward(self, grid: KernelGrid, groups: slice = slice(None),
                conditioning: torch.Tensor | None = None) -> torch.Tensor:
        return self._output(self.features(grid, conditioning), groups, grid)

    def features(self, grid: KernelGrid, conditioning: torch.Tensor | None = None) -> torch.Tensor:
        """The last hidden layer at every tap, ``[N, hidden]`` (``[B, N, hidden]`` with FiLM)."""
        if (conditioning is None) != (self.film is None):
            raise ValueError("this SirenFilter " + ("needs a `conditioning` [B, cond_dim] tensor (it has FiLM)"
                                                    if self.film is not None else "has no FiLM: pass no conditioning"))
        t = torch.stack(grid.mesh(), dim=-1)  # N, D
        h = self.embedding(t)  # N, E
        if self.learnable_omega:
            scale = self.omega_scale.clamp(self.omega_scale_min, self.omega_scale_max)
            h = 2 * math.pi * self.omega_0 * scale.to(h.dtype) * h
        h = torch.sin(h)
        films = iter(()) if self.film is None else iter(self.film(conditioning.to(h.dtype)))
        if self.film is not None and self.film_after_embedding:
            gamma, beta = next(films)
            h = gamma * h + beta  # B, N, E
        for layer in self.hidden:
            h = torch.sin(layer(h))
            if self.film is not None:
                gamma, beta = next(films)
                h = gamma * h + beta
        return h

    def flop_count(self, grid_numel: int) -> int:
        """Matmul FLOPs (2 per MAC) of building all groups at ``grid_numel`` taps."""
        macs = self.spatial_dims * self.embedding_dim + sum(l.in_features * l.out_features for l in self.hidden)
        return 2 * grid_numel * (macs + self.out.in_features * self.num_groups)


def _block_mask(rows: int, cols: int, num_blocks: int, off_scale: float) -> torch.Tensor:
    """1 on the ``num_blocks`` diagonal blocks of a ``[rows, cols]`` weight, ``off_scale`` elsewhere."""
    r = torch.arange(rows)[:, None] // (rows // num_blocks)
    c = torch.arange(cols)[None, :] // (cols // num_blocks)
    return torch.where(r == c, 1.0, off_scale).to(torch.get_default_dtype())


class RandomFourierFilter(_GridGenerator):
    """Random Fourier features -> MLP: ``z = W0 t + b0`` (``W0 ~ N(0, (2π ω0)^2)``, b0 = 0), features
    ``[cos z, sin z]`` (E in all), ``num_layers - 1`` layers ``Linear -> activation`` of width H, and the
    output layer scaled by ``sqrt(1 / prod(L_cache))`` at init. ``forward(grid, groups)`` -> ``[G_sel, *K]``."""

    def __init__(self, num_groups: int, spatial_dims: int, *, L_cache: int | Sequence[int], embedding_dim: int = 64,
                 hidden_dim: int = 64, num_layers: int = 3, omega_0: float = 10.0, activation: str = "silu",
                 bias: bool = True):
        super().__init__(num_groups, spatial_dims, L_cache)
        if embedding_dim % 2 or num_layers < 2:
            raise ValueError(f"RandomFourierFilter needs an even embedding_dim and num_layers >= 2; got {embedding_dim}, "
                             f"{num_layers}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} must be one of {sorted(ACTIVATIONS)}")
        self.embedding_dim, self.hidden_dim, self.num_layers, self.omega_0 = embedding_dim, hidden_dim, num_layers, omega_0
        self.embedding = nn.Linear(spatial_dims, embedding_dim // 2, bias=bias)
        widths = [embedding_dim] + [hidden_dim] * (num_layers - 1)
        self.hidden = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(widths[:-1], widths[1:]))
        self.act = ACTIVATIONS[activation]()
        self.out = nn.Linear(hidden_dim, num_groups, bias=bias)
        with torch.no_grad():
            self.embedding.weight.normal_(0.0, 2 * math.pi * omega_0)
            if self.embedding.bias is not None:
                self.embedding.bias.zero_()
            self.out.weight.mul_(self._wang_scale())

    def forward(self, grid: KernelGrid, groups: slice = slice(None),
                conditioning: torch.Tensor | None = None) -> torch.Tensor:
        return self._output(self.features(grid, conditioning), groups, grid)

    def features(self, grid: KernelGrid, conditioning: torch.Tensor | None = None) -> torch.Tensor:
        """The last hidden layer at every tap, ``[N, hidden]``."""
        if conditioning is not None:
            raise ValueError("RandomFourierFilter takes no conditioning; use SirenFilter(cond_dim=...) for FiLM")
        z = self.embedding(torch.stack(grid.mesh(), dim=-1))  # N, E/2
        h = torch.cat([torch.cos(z), torch.sin(z)], dim=-1)
        for layer in self.hidden:
            h = self.act(layer(h))
        return h

    def flop_count(self, grid_numel: int) -> int:
        macs = self.spatial_dims * self.embedding_dim // 2 + sum(l.in_features * l.out_features for l in self.hidden)
        return 2 * grid_numel * (macs + self.out.in_features * self.num_groups)
