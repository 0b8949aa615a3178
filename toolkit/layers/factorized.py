"""Low-rank factorized layers: W ≈ U·V with rank r.

Every factorized layer exposes the same small interface so the optimizer (group lasso), the
builder, export and `rlhf factorize` can treat them alike:

- ``rank``                 the current rank r;
- ``dense_weight()``       the dense weight the factors represent, in the layer's native shape;
- ``rank_factors()``       [(parameter, dim)] — the rank index runs along ``dim`` of each parameter;
                           rank component k is the slice k of each (a column of U with a row of V);
- ``component_norms()``    (r,) Euclidean norm of each rank component over all its factor slices;
- ``prune_ranks(keep)``    drop the components not in ``keep``; the layer becomes genuinely smaller;
- ``from_dense(layer, …)`` truncated-SVD initialisation from a dense layer (rank, ratio or energy).

The SVD split is balanced: with W = P Σ Qᵀ, U = P_r Σ_r^½ and V = Σ_r^½ Q_rᵀ, so both factors carry
the same scale (this keeps the group-lasso penalty ‖U[:,k]‖² + ‖V[k,:]‖² meaningful).
"""

from __future__ import annotations

import torch
from torch import nn

from toolkit.layers.rank import choose_rank


def _balanced_svd_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a 2-D matrix (out, in) into U (out, r), V (r, in) by truncated SVD, computed in float64."""
    p, s, qh = torch.linalg.svd(w.double(), full_matrices=False)
    root = s[:rank].sqrt()
    u = p[:, :rank] * root  # (out, r)
    v = root[:, None] * qh[:rank]  # (r, in)
    return u.to(w.dtype), v.to(w.dtype)


def _singular_values(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(w.double())


class FactorizedMixin:
    """Shared rank bookkeeping; subclasses define ``rank_factors``."""

    def rank_factors(self) -> list[tuple[torch.Tensor, int]]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def rank(self) -> int:
        p, dim = self.rank_factors()[0]
        return int(p.shape[dim])

    def component_norms(self) -> torch.Tensor:
        """Norm of each rank component: sqrt(Σ over factors of ‖slice k‖²), shape (r,)."""
        sq = None
        for p, dim in self.rank_factors():
            other = [d for d in range(p.dim()) if d != dim]
            s = p.detach().pow(2).sum(dim=other) if other else p.detach().pow(2)
            sq = s if sq is None else sq + s
        assert sq is not None
        return sq.sqrt()

    def prune_ranks(self, keep: torch.Tensor | list[int]) -> None:
        """Keep only the rank components with indices in ``keep`` (at least one).

        The factor parameters are replaced by smaller ones, so an optimizer holding the old
        parameters must be rebuilt or re-bound afterwards.
        """
        idx = torch.as_tensor(keep, dtype=torch.long).flatten()
        if idx.numel() == 0:
            raise ValueError("expected at least one rank component to keep, got none")
        if int(idx.max()) >= self.rank or int(idx.min()) < 0:
            raise ValueError(f"expected component indices in [0, {self.rank}), got {idx.tolist()}")
        for p, dim in self.rank_factors():
            owner, name = self._owner_of(p)
            new = nn.Parameter(p.detach().index_select(dim, idx.to(p.device)).clone())
            setattr(owner, name, new)
        self._after_prune(int(idx.numel()))

    def _after_prune(self, rank: int) -> None:
        """Update size attributes of the sub-modules after pruning."""

    def _owner_of(self, param: torch.Tensor) -> tuple[nn.Module, str]:
        assert isinstance(self, nn.Module)
        for mod in self.modules():
            for name, p in mod.named_parameters(recurse=False):
                if p is param:
                    return mod, name
        raise LookupError("factor parameter not found in module")  # pragma: no cover


class FactorizedLinear(FactorizedMixin, nn.Module):
    """y = U(V(x)) = x Vᵀ Uᵀ + b, a rank-r stand-in for a dense (out x in) linear layer.

    V: in -> r, no bias (weight (r, in)); U: r -> out, with bias (weight (out, r)).
    Parameters: r·(in + out) (+ out bias) instead of in·out.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"expected rank in [1, {min(in_features, out_features)}], got {rank}")
        self.in_features, self.out_features = in_features, out_features
        self.V = nn.Linear(in_features, rank, bias=False)
        self.U = nn.Linear(rank, out_features, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise so that U·V has the variance of a default dense nn.Linear of the same shape."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.U.bias is not None)
        with torch.no_grad():
            u, v = _balanced_svd_factors(dense.weight, self.rank)
            self.U.weight.copy_(u)
            self.V.weight.copy_(v)
            if self.U.bias is not None and dense.bias is not None:
                self.U.bias.copy_(dense.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.U(self.V(x))  # (..., in) -> (..., r) -> (..., out)

    def rank_factors(self) -> list[tuple[torch.Tensor, int]]:
        return [(self.U.weight, 1), (self.V.weight, 0)]

    def dense_weight(self) -> torch.Tensor:
        return self.U.weight @ self.V.weight  # (out, in)

    def _after_prune(self, rank: int) -> None:
        self.V.out_features = rank
        self.U.in_features = rank

    @classmethod
    def from_dense(
        cls,
        layer: nn.Linear,
        *,
        rank: int | None = None,
        ratio: float | None = None,
        energy: float | None = None,
        fallback: bool = True,
    ) -> FactorizedLinear | nn.Linear:
        """Truncated SVD of a dense nn.Linear.

        Args:
            layer: the dense layer (left unchanged).
            rank, ratio, energy: exactly one rank rule (see toolkit.layers.rank).
            fallback: return ``layer`` itself when the factorization would not reduce multiply-adds;
                False factorizes anyway (useful to check that full rank reproduces the layer).

        Returns:
            A FactorizedLinear on the layer's device and dtype, or the dense layer.
        """
        w = layer.weight.detach()
        choice = choose_rank(
            *w.shape,
            rank=rank,
            ratio=ratio,
            energy=energy,
            singular_values=_singular_values(w) if energy is not None else None,
        )
        if fallback and not choice.factorize:
            return layer
        out = cls(layer.in_features, layer.out_features, choice.rank, bias=layer.bias is not None)
        out.to(device=w.device, dtype=w.dtype)
        u, v = _balanced_svd_factors(w, choice.rank)
        with torch.no_grad():
            out.U.weight.copy_(u)
            out.V.weight.copy_(v)
            if layer.bias is not None and out.U.bias is not None:
                out.U.bias.copy_(layer.bias.detach())
        return out


class FactorizedConv2d(FactorizedMixin, nn.Module):
    """A k x k convolution to r channels followed by a 1 x 1 convolution to out channels.

    V: Conv2d(in, r, k, stride, padding, bias=False), weight (r, in, k, k);
    U: Conv2d(r, out, 1, bias), weight (out, r, 1, 1).
    The dense kernel is W[o, i, :, :] = Σ_k U[o, k] V[k, i, :, :], i.e. W.view(out, in·k·k) = U·V.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        rank: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        full = min(out_channels, in_channels * kernel_size * kernel_size)
        if not 1 <= rank <= full:
            raise ValueError(f"expected rank in [1, {full}], got {rank}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.V = nn.Conv2d(in_channels, rank, kernel_size, stride=stride, padding=padding, bias=False)
        self.U = nn.Conv2d(rank, out_channels, 1, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise from the SVD of a default dense convolution of the same shape."""
        dense = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, bias=self.U.bias is not None)
        with torch.no_grad():
            self._load_dense(dense.weight, dense.bias)

    def _load_dense(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        out_c, in_c, k, _ = weight.shape
        u, v = _balanced_svd_factors(weight.reshape(out_c, in_c * k * k), self.rank)
        self.U.weight.copy_(u.reshape(out_c, self.rank, 1, 1))
        self.V.weight.copy_(v.reshape(self.rank, in_c, k, k))
        if bias is not None and self.U.bias is not None:
            self.U.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.U(self.V(x))  # (B, in, H, W) -> (B, r, H', W') -> (B, out, H', W')

    def rank_factors(self) -> list[tuple[torch.Tensor, int]]:
        return [(self.U.weight, 1), (self.V.weight, 0)]

    def dense_weight(self) -> torch.Tensor:
        r = self.rank
        u = self.U.weight.reshape(self.out_channels, r)
        v = self.V.weight.reshape(r, -1)
        return (u @ v).reshape(self.out_channels, self.in_channels, self.kernel_size, self.kernel_size)

    def _after_prune(self, rank: int) -> None:
        self.V.out_channels = rank
        self.U.in_channels = rank

    @classmethod
    def from_dense(
        cls,
        layer: nn.Conv2d,
        *,
        rank: int | None = None,
        ratio: float | None = None,
        energy: float | None = None,
        fallback: bool = True,
    ) -> FactorizedConv2d | nn.Conv2d:
        """Truncated SVD of a dense square-kernel nn.Conv2d (groups=1, dilation=1); see FactorizedLinear.from_dense."""
        k = layer.kernel_size[0]
        if (
            layer.groups != 1
            or layer.kernel_size != (k, k)
            or layer.dilation != (1, 1)
            or len(set(layer.stride)) != 1
            or not isinstance(layer.padding, tuple)
            or len(set(layer.padding)) != 1
        ):
            raise ValueError(
                "expected a Conv2d with a square kernel, equal strides and paddings, groups=1 and dilation=1, "
                f"got kernel={layer.kernel_size} stride={layer.stride} padding={layer.padding} "
                f"groups={layer.groups} dilation={layer.dilation}"
            )
        w = layer.weight.detach()
        flat = w.reshape(w.shape[0], -1)
        choice = choose_rank(
            *flat.shape,
            rank=rank,
            ratio=ratio,
            energy=energy,
            singular_values=_singular_values(flat) if energy is not None else None,
        )
        if fallback and not choice.factorize:
            return layer
        out = cls(
            layer.in_channels,
            layer.out_channels,
            k,
            choice.rank,
            stride=layer.stride[0],
            padding=int(layer.padding[0]),
            bias=layer.bias is not None,
        )
        out.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out._load_dense(w, None if layer.bias is None else layer.bias.detach())
        return out


class FactorizedEmbedding(FactorizedMixin, nn.Module):
    """A (vocab x r) lookup table followed by an (r x d) projection: E ≈ A·B.

    V: nn.Embedding(vocab, r), weight A (vocab, r); U: nn.Linear(r, d, bias=False), weight Bᵀ (d, r).
    As a linear map of one-hot rows, Eᵀ = Bᵀ·Aᵀ = U.weight · V.weightᵀ, so component k is column k
    of both weights.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int) -> None:
        super().__init__()
        if not 1 <= rank <= min(num_embeddings, embedding_dim):
            raise ValueError(f"expected rank in [1, {min(num_embeddings, embedding_dim)}], got {rank}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.V = nn.Embedding(num_embeddings, rank)
        self.U = nn.Linear(rank, embedding_dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        dense = nn.Embedding(self.num_embeddings, self.embedding_dim)
        with torch.no_grad():
            self._load_dense(dense.weight)

    def _load_dense(self, table: torch.Tensor) -> None:
        a, b = _balanced_svd_factors(table, self.rank)  # (vocab, r), (r, d)
        self.V.weight.copy_(a)
        self.U.weight.copy_(b.t())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.U(self.V(ids))  # (B, T) -> (B, T, r) -> (B, T, d)

    def rank_factors(self) -> list[tuple[torch.Tensor, int]]:
        return [(self.U.weight, 1), (self.V.weight, 1)]

    def dense_weight(self) -> torch.Tensor:
        return self.V.weight @ self.U.weight.t()  # (vocab, d)

    def _after_prune(self, rank: int) -> None:
        self.V.embedding_dim = rank
        self.U.in_features = rank

    @classmethod
    def from_dense(
        cls,
        layer: nn.Embedding,
        *,
        rank: int | None = None,
        ratio: float | None = None,
        energy: float | None = None,
        fallback: bool = True,
    ) -> FactorizedEmbedding | nn.Embedding:
        """Truncated SVD of a dense nn.Embedding table (vocab, d); see FactorizedLinear.from_dense."""
        w = layer.weight.detach()
        choice = choose_rank(
            *w.shape,
            rank=rank,
            ratio=ratio,
            energy=energy,
            singular_values=_singular_values(w) if energy is not None else None,
        )
        if fallback and not choice.factorize:
            return layer
        out = cls(layer.num_embeddings, layer.embedding_dim, choice.rank)
        out.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out._load_dense(w)
        return out


FACTORIZED_TYPES = (FactorizedLinear, FactorizedConv2d, FactorizedEmbedding)


def factorized_modules(model: nn.Module) -> dict[str, FactorizedMixin]:
    """All factorized layers of a model, by qualified module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FactorizedMixin)}
