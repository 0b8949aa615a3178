"""The exact layer-block Gauss-Newton preconditioner: the reference K-FAC approximates.

K-FAC (``toolkit.optim.kfac``) approximates each diagonal block of the Gauss-Newton matrix by a
Kronecker product. This module inverts the same blocks exactly (block-Jacobi), as a reference: the
iterations CG needs with it are what a perfect approximation of those blocks gives (not a strict
bound on every approximation: CG's count is not monotone in how good the approximation is).

For a linear sublayer s = W a + b with inputs ā_i = [a_i; 1] (i = 1..N examples), K outputs z_i and
the loss Hessian H_L = blockdiag(H_i) over the examples (a batch-mean loss), write S_i = H_i^½ and
M_i = S_i ∂z_i/∂s_i (K × out: the loss-weighted output-side rows, one backward pass per column
of S over the whole batch). The block of (W, b), in the row-major order of the (out, in+1) matrix
[W b], is

    B_l = Σ_i (M_iᵀ M_i) ⊗ (ā_i ā_iᵀ) = Uᵀ U,    U = the rows  m ⊗ ā_i  for the rows m of every M_i.

Each M_i is first compressed to its nonzero singular directions (σ v for the singular pairs with
σ > ``rank_rtol`` · the block's largest σ): a layer below a bottleneck (an autoencoder's 6-unit code)
then has ≤ 6 rows per example instead of K. The dropped part changes B_l by at most
N rank_rtol² σ_max² max_i ‖ā_i‖² (about N rank_rtol² relative to its largest eigenvalue), below the
rounding of a float32 model's Jacobians.

With R rows in U and P = out·(in+1) parameters, (B_l + λI)⁻¹ v is solved exactly in float64 by the
cheaper of two Cholesky factorizations (``_route``):

- "kernel" (Woodbury): (Uᵀ U + λI)⁻¹ v = (v − Uᵀ (U Uᵀ + λI)⁻¹ U v) / λ, where the R × R
  kernel U Uᵀ has entries (m_ρ · m_σ)(ā_i(ρ) · ā_i(σ));
- "block": the P × P block Σ_i (M_iᵀ M_i) ⊗ (ā_i ā_iᵀ) + λI itself.

The cost of a refresh is one backward pass per model output plus, per block, the cheaper of
R²(out + d) + R³/3 and N·P² + P³/3 flops; ``max_rows`` refuses a model whose blocks could need a
factorization beyond it (checked before the backward passes, on the bound min(N·min(K, out), P),
so a block that the compression would bring under it is refused too) instead of running for hours:
the CURVES autoencoder (784 outputs) has blocks of min(R, P) up to 94,080. The model's output
must be (N, K); the loss's Hessian must be one ``kfac._output_sqrt_hessians`` can take the square
root of (squared errors, binary cross-entropy, softmax cross-entropy with K ≤ 256).

Parameters outside every linear block have no block: B is 0 there and the map is r ↦ r / λ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from toolkit.optim.kfac import _Block, _output_sqrt_hessians, block_forward, blockwise, linear_blocks


@dataclass
class _BlockData:
    """One block's curvature data: inputs ā_i, the compressed rows m_ρ with their examples, the route."""

    block: _Block
    acts: torch.Tensor  # (N, d), d = in + 1 with a bias, float64
    rows: torch.Tensor  # (R, out), float64, grouped by example in increasing order
    example: torch.Tensor  # (R,) the example i(ρ) of each row
    route: str = "kernel"  # "kernel" (Woodbury, R × R) or "block" (P × P)

    @property
    def size(self) -> int:
        """The order of the Cholesky factorization of its route: R or P."""
        return len(self.rows) if self.route == "kernel" else self.block.out_features * self.acts.shape[1]


def _route(n: int, d: int, out_f: int, r: int, max_rows: int) -> str:
    """The cheaper factorization (flops to form and factorize) whose order is at most ``max_rows``.

    Kernel: R²(out + d) to form, R³/3 to factorize; block: N·P² to form (Σ_i C_i ⊗ ā_i ā_iᵀ as one
    product), P³/3 to factorize.
    """
    p = out_f * d
    cost = {"kernel": r * r * (out_f + d) + r**3 / 3, "block": n * p * p + p**3 / 3}
    allowed = [k for k, order in (("kernel", r), ("block", p)) if order <= max_rows] or ["kernel", "block"]
    return min(allowed, key=lambda k: cost[k])


def _compress(m: torch.Tensor, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows σ v of the singular pairs of each M_i (N, K, out) with σ > rtol · max σ, and their examples."""
    _, sv, vh = torch.linalg.svd(m, full_matrices=False)  # (N, q), (N, q, out)
    keep = sv > rtol * float(sv.max()) if sv.numel() and float(sv.max()) > 0 else sv > 0
    rows = (sv.unsqueeze(2) * vh)[keep]  # (R, out)
    example = torch.arange(m.shape[0], device=m.device).unsqueeze(1).expand_as(sv)[keep]
    return rows, example


def _cholesky_solve(chol: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """(L Lᵀ)⁻¹ rhs by two triangular solves (torch.cholesky_solve is ~10x slower on one column)."""
    half = torch.linalg.solve_triangular(chol, rhs, upper=False)
    return torch.linalg.solve_triangular(chol.T, half, upper=True)


def _inverse_of(data: _BlockData, damping: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """V ↦ (B_l + λI)⁻¹ V on the (out, d) matrix V, by the block's route (module docstring)."""
    acts, rows, example = data.acts, data.rows, data.example
    n, d = acts.shape
    out_f = rows.shape[1]
    eye = lambda k: torch.eye(k, dtype=acts.dtype, device=acts.device)  # noqa: E731
    if data.route == "kernel":  # Woodbury on the R × R kernel
        gram = (acts @ acts.T)[example][:, example]  # (R, R): ā_i(ρ) · ā_i(σ)
        chol = torch.linalg.cholesky((rows @ rows.T) * gram + damping * eye(len(rows)))

        def kernel_solve(v: torch.Tensor) -> torch.Tensor:
            y = acts @ v.T  # (N, out)
            uv = (rows * y[example]).sum(1, keepdim=True)  # (R, 1): U v
            w = _cholesky_solve(chol, uv)  # (R, 1)
            per_example = torch.zeros(n, out_f, dtype=acts.dtype, device=acts.device)
            per_example.index_add_(0, example, rows * w)  # (N, out)
            return (v - per_example.T @ acts) / damping  # (out, d)

        return lambda v: kernel_solve(v.to(acts.dtype))
    counts = torch.bincount(example, minlength=n).tolist()
    c = torch.stack([m.T @ m for m in rows.split(counts)])  # (N, out, out): C_i = M_iᵀ M_i
    x = acts.unsqueeze(2) * acts.unsqueeze(1)  # (N, d, d): ā_i ā_iᵀ
    block = (c.reshape(n, -1).T @ x.reshape(n, -1)).view(out_f, out_f, d, d)  # [o, o', j, j']
    block = block.permute(0, 2, 1, 3).reshape(out_f * d, out_f * d)  # [(o, j), (o', j')]: [W b] row-major
    chol = torch.linalg.cholesky(block + damping * eye(out_f * d))
    return lambda v: _cholesky_solve(chol, v.to(acts.dtype).reshape(-1, 1)).view(out_f, d)


class BlockGaussNewton:
    """Exact (B + λI)⁻¹ with B the layer-block-diagonal Gauss-Newton matrix; see the module docstring.

    The blocks are K-FAC's (``kfac.linear_blocks``): one per ``nn.Linear`` (sub)layer whose weight is
    optimized, weight and bias together; a factorized layer's U and V are two blocks.

    Args:
        model: the module.
        params: the optimized parameters in θ order.
        offsets: start of each parameter in θ (len(params) + 1 entries).
        max_rows: the largest factorization allowed per block: every block's bound
            min(N·min(K, out), P) must be at most this.
        rank_rtol: singular values of a per-example M_i below rank_rtol · the block's largest are dropped.

    Raises:
        ValueError: ``max_rows`` < 1 or ``rank_rtol`` outside [0, 1).
    """

    def __init__(
        self, model: nn.Module, params: Sequence[torch.Tensor], offsets: Sequence[int],
        max_rows: int = 12_000, rank_rtol: float = 1e-6,
    ) -> None:  # fmt: skip
        if max_rows < 1:
            raise ValueError(f"max_rows: expected >= 1, got {max_rows}")
        if not 0 <= rank_rtol < 1:
            raise ValueError(f"rank_rtol: expected in [0, 1), got {rank_rtol}")
        self.model = model
        self.blocks = linear_blocks(model, params, offsets)
        self.max_rows = max_rows
        self.rank_rtol = rank_rtol
        self.data: list[_BlockData] = []

    def sizes(self) -> list[tuple[str, int]]:
        """Per block after ``update``: its route ("kernel" or "block") and the order of its factorization."""
        return [(b.route, b.size) for b in self.data]

    def update(self, inputs: tuple[Any, ...], loss_of_outputs: Callable[[Any], torch.Tensor]) -> None:
        """Record every block's inputs and loss-weighted output-side rows on a batch.

        Args:
            inputs: the batch, ``model(*inputs)``; the model's output must be (N, K).
            loss_of_outputs: outputs ↦ batch-mean loss on this batch.

        Raises:
            ValueError: an output that is not (N, K), or a block whose solve would exceed ``max_rows``.
        """
        acts, outs, z = block_forward(self.model, self.blocks, inputs, "BlockGaussNewton")
        if z.dim() != 2:
            raise ValueError(f"BlockGaussNewton: expected model outputs (N, K), got {tuple(z.shape)}")
        n, k_out = z.shape
        bounds = {i: min(n * min(k_out, blk.out_features), blk.out_features * (blk.in_features + (blk.bias is not None)))
                  for i, blk in enumerate(self.blocks)}  # fmt: skip
        over = {i: b for i, b in bounds.items() if b > self.max_rows}
        if over:
            listed = ", ".join(
                f"block {i} ({self.blocks[i].out_features} outputs) up to {b}" for i, b in over.items()
            )
            raise ValueError(
                f"BlockGaussNewton: expected factorizations of order at most max_rows={self.max_rows}, got {listed} "
                f"(min(N·min(K, out), parameters) with N={n} examples, K={k_out} model outputs)"
            )
        live = [k for k in range(len(self.blocks)) if k in outs and outs[k].requires_grad]
        ws = _output_sqrt_hessians(loss_of_outputs, z, "exact", None) if live else []
        cols: dict[int, list[torch.Tensor]] = {k: [] for k in live}
        with torch.enable_grad():
            for j, w in enumerate(ws):
                grads = torch.autograd.grad(
                    z, [outs[k] for k in live], w, retain_graph=j + 1 < len(ws), allow_unused=True
                )
                for k, gk in zip(live, grads):
                    cols[k].append(torch.zeros_like(outs[k]) if gk is None else gk.detach())  # (N, out)
        self.data = []
        for k, blk in enumerate(self.blocks):
            a = acts[k].double() if k in acts else torch.zeros(n, blk.in_features, dtype=torch.float64)
            if blk.bias is not None:
                a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)  # (N, in+1)
            if cols.get(k):
                rows, example = _compress(torch.stack(cols[k], dim=1).double(), self.rank_rtol)  # (N, K, out)
            else:  # not on this batch's path: no curvature
                rows = torch.zeros(0, blk.out_features, dtype=torch.float64, device=a.device)
                example = torch.zeros(0, dtype=torch.long, device=a.device)
            route = _route(n, a.shape[1], blk.out_features, len(rows), self.max_rows)
            self.data.append(_BlockData(blk, a, rows, example, route))

    def inverse(self, damping: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """r ↦ (B + λI)⁻¹ r, factorizing every block (float64 inside, r's dtype outside).

        Args:
            damping: λ > 0.

        Returns:
            The map (P,) -> (P,).

        Raises:
            RuntimeError: ``update`` was never called.
            ValueError: λ ≤ 0.
        """
        if len(self.data) != len(self.blocks):
            raise RuntimeError("BlockGaussNewton.inverse: call update() first")
        if not damping > 0:
            raise ValueError(f"damping: expected > 0, got {damping}")
        return blockwise([(b.block, _inverse_of(b, damping)) for b in self.data], outside=1.0 / damping)
