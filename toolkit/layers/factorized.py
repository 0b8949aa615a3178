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

from typing import Any

import torch
from torch import nn

from toolkit.errors import InputError
from toolkit.layers.rank import choose_rank


def balanced_svd_factors(
    matrix: torch.Tensor, rank: int, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a 2-D map M (out, n) into U (out, r), V (r, n) by truncated SVD, in float64.

    With M·S = P Σ Qᵀ (S = diag(scale), the identity when ``scale`` is None):
    U = P_r Σ_r^½ and V = Σ_r^½ Q_rᵀ S⁻¹. A ``scale`` makes the truncation activation-aware (ASVD).

    Returns:
        (U, V) as float64 tensors on the matrix's device.
    """
    m = matrix.double()
    target = m if scale is None else m * scale[None, :]  # (out, n)
    p, s, qh = torch.linalg.svd(target, full_matrices=False)
    root = s[:rank].sqrt()
    u = p[:, :rank] * root  # (out, r)
    v = root[:, None] * qh[:rank]  # (r, n)
    if scale is not None:
        v = v / scale[None, :]
    return u, v


def _without_init(cls: type[Any], *args: Any, like: torch.Tensor, **kwargs: Any) -> Any:
    """Construct a layer on the meta device (skipping its SVD initialisation), then allocate it
    uninitialised on ``like``'s device and dtype; the caller fills in the factors."""
    with torch.device("meta"):
        layer = cls(*args, **kwargs)
    return layer.to_empty(device=like.device).to(dtype=like.dtype)


def check_conv2d(layer: nn.Conv2d) -> int:
    """The kernel size k of a convolution a FactorizedConv2d can stand in for.

    Raises:
        ValueError: unless the kernel is square, strides and paddings are equal integers, groups=1
            and dilation=1.
    """
    k = layer.kernel_size[0]
    if (
        layer.groups != 1
        or layer.kernel_size != (k, k)
        or layer.dilation != (1, 1)
        or len(set(layer.stride)) != 1
        or not isinstance(layer.padding, tuple)
        or len(set(layer.padding)) != 1
    ):
        raise InputError(
            "expected a Conv2d with a square kernel, equal strides and paddings, groups=1 and dilation=1, "
            f"got kernel={layer.kernel_size} stride={layer.stride} padding={layer.padding} "
            f"groups={layer.groups} dilation={layer.dilation}"
        )
    return k


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
            raise InputError(f"expected rank in [1, {min(in_features, out_features)}], got {rank}")
        self.in_features, self.out_features = in_features, out_features
        self.V = nn.Linear(in_features, rank, bias=False)
        self.U = nn.Linear(rank, out_features, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise so that U·V has the variance of a default dense nn.Linear of the same shape."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.U.bias is not None)
        self._set_factors(*balanced_svd_factors(dense.weight, self.rank), dense.bias)

    def _set_factors(self, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> None:
        with torch.no_grad():
            self.U.weight.copy_(u)  # (out, r)
            self.V.weight.copy_(v)  # (r, in)
            if bias is not None and self.U.bias is not None:
                self.U.bias.copy_(bias)

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
        u, v = balanced_svd_factors(w, choice.rank)
        return cls.from_factors(u.to(w), v.to(w), None if layer.bias is None else layer.bias.detach())

    @classmethod
    def from_factors(
        cls, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None
    ) -> FactorizedLinear:
        """The layer with U.weight = u (out, r), V.weight = v (r, in) and U.bias = bias, on u's device and dtype.

        Raises:
            ValueError: when the factor shapes do not chain.
        """
        if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[0]:
            raise ValueError(
                f"expected factors (out, r) and (r, in), got {tuple(u.shape)} and {tuple(v.shape)}"
            )
        layer = _without_init(cls, v.shape[1], u.shape[0], u.shape[1], bias=bias is not None, like=u)
        layer._set_factors(u, v, bias)
        return layer  # type: ignore[no-any-return]


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
            raise InputError(f"expected rank in [1, {full}], got {rank}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.V = nn.Conv2d(in_channels, rank, kernel_size, stride=stride, padding=padding, bias=False)
        self.U = nn.Conv2d(rank, out_channels, 1, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise from the SVD of a default dense convolution of the same shape."""
        dense = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, bias=self.U.bias is not None)
        flat = dense.weight.reshape(self.out_channels, -1)  # (out, in·k·k)
        self._set_factors(*balanced_svd_factors(flat, self.rank), dense.bias)

    def _set_factors(self, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> None:
        r, k = self.rank, self.kernel_size
        with torch.no_grad():
            self.U.weight.copy_(u.reshape(self.out_channels, r, 1, 1))  # (out, r) as 1x1 kernels
            self.V.weight.copy_(v.reshape(r, self.in_channels, k, k))  # (r, in·k·k) as k x k kernels
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
        k = check_conv2d(layer)
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
        u, v = balanced_svd_factors(flat, choice.rank)
        return cls.from_factors(
            u.to(w),
            v.to(w),
            None if layer.bias is None else layer.bias.detach(),
            in_channels=layer.in_channels,
            kernel_size=k,
            stride=layer.stride[0],
            padding=int(layer.padding[0]),
        )

    @classmethod
    def from_factors(
        cls,
        u: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        in_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
    ) -> FactorizedConv2d:
        """The layer with factors u (out, r) and v (r, in·k·k) of the flattened kernel, on u's device and dtype.

        Raises:
            ValueError: when the factor shapes do not chain or do not match in_channels·k·k.
        """
        if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[0]:
            raise ValueError(
                f"expected factors (out, r) and (r, n), got {tuple(u.shape)} and {tuple(v.shape)}"
            )
        if v.shape[1] != in_channels * kernel_size * kernel_size:
            raise ValueError(
                f"expected V with in_channels·k·k = {in_channels * kernel_size * kernel_size} columns, "
                f"got {v.shape[1]}"
            )
        layer = _without_init(
            cls, in_channels, u.shape[0], kernel_size, u.shape[1],
            stride=stride, padding=padding, bias=bias is not None, like=u,
        )  # fmt: skip
        layer._set_factors(u, v, bias)
        return layer  # type: ignore[no-any-return]


class FactorizedEmbedding(FactorizedMixin, nn.Module):
    """A (vocab x r) lookup table followed by an (r x d) projection: E ≈ A·B.

    V: nn.Embedding(vocab, r), weight A (vocab, r); U: nn.Linear(r, d, bias=False), weight Bᵀ (d, r).
    As a linear map of one-hot rows, Eᵀ = Bᵀ·Aᵀ = U.weight · V.weightᵀ, so component k is column k
    of both weights.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int) -> None:
        super().__init__()
        if not 1 <= rank <= min(num_embeddings, embedding_dim):
            raise InputError(f"expected rank in [1, {min(num_embeddings, embedding_dim)}], got {rank}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.V = nn.Embedding(num_embeddings, rank)
        self.U = nn.Linear(rank, embedding_dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        dense = nn.Embedding(self.num_embeddings, self.embedding_dim)
        a, b = balanced_svd_factors(dense.weight, self.rank)  # E = A·B: (vocab, r), (r, d)
        self._set_factors(b.t(), a.t())  # Eᵀ = Bᵀ·Aᵀ

    def _set_factors(self, u: torch.Tensor, v: torch.Tensor) -> None:
        with torch.no_grad():
            self.U.weight.copy_(u)  # (d, r)
            self.V.weight.copy_(v.t())  # (vocab, r)

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
        a, b = balanced_svd_factors(w, choice.rank)  # E = A·B: (vocab, r), (r, d)
        return cls.from_factors(b.t().to(w), a.t().to(w))  # Eᵀ = Bᵀ·Aᵀ

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor) -> FactorizedEmbedding:
        """The layer with Eᵀ = u (d, r) · v (r, vocab), on u's device and dtype.

        Raises:
            ValueError: when the factor shapes do not chain.
        """
        if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[0]:
            raise ValueError(
                f"expected factors (d, r) and (r, vocab), got {tuple(u.shape)} and {tuple(v.shape)}"
            )
        layer = _without_init(cls, v.shape[1], u.shape[0], u.shape[1], like=u)
        layer._set_factors(u, v)
        return layer  # type: ignore[no-any-return]


FACTORIZED_TYPES = (FactorizedLinear, FactorizedConv2d, FactorizedEmbedding)


def factorized_modules(model: nn.Module) -> dict[str, FactorizedMixin]:
    """All factorized layers of a model, by qualified module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FactorizedMixin)}
