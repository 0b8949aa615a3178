"""Kronecker-factored (K-FAC) preconditioner for CG on the Gauss-Newton system.

For a linear sublayer s = W a + b (``nn.Linear``, including the U and V sublayers of a factorized
layer, which are two ``nn.Linear``), the Gauss-Newton block of (W, b) on a batch is

    C_l = Σ_i (ā_i ā_iᵀ) ⊗ (J_iᵀ H_i J_i),     ā_i = [a_i; 1],  J_i = ∂z_i/∂s_i,  H_i = ∂²L/∂z_i²,

which K-FAC (Martens & Grosse 2015) approximates by  C_l ≈ A ⊗ G  with

    A = (1/B) Σ_i ā_i ā_iᵀ,     G = Σ_i g_i g_iᵀ,   g_i = J_iᵀ w_i,

where the w_i are drawn with E[w_i w_iᵀ] = H_i ("the model's predictive distribution" of the
Gauss-Newton matrix), ``samples`` draws per example (default 16; see ``KFAC``): for a loss whose output Hessians are diagonal (squared errors: c·I; binary
cross-entropy) w_i = √diag(H_i) ⊙ ξ_i with ξ_i ~ N(0, I), found with two output-Hessian products;
otherwise (softmax cross-entropy) the per-example blocks H_i are formed from C output-Hessian
products (C ≤ 256) and w_i = H_i^{½} ξ_i; a per-position loss on (B, T, V) outputs (a language
model's next-token cross-entropy) has one V×V block per position, taken the same way (V ≤ 256). ``samples="exact"`` uses the C columns of H_i^{½} instead of a draw, so that for
one example the block is the exact Gauss-Newton block. Leading axes beyond the batch (sequences)
count as extra examples ("K-FAC expand").

The factors are re-estimated every few outer steps (the caller decides); each refresh stores their
eigendecompositions A = Q_A diag(a) Q_Aᵀ, G = Q_G diag(g) Q_Gᵀ, so that the damping λ (which
changes every step) costs nothing to change. With γ = λ + a (a: the mean L2 coefficient of the
block) and R = [r_W, r_b] reshaped (out, in + 1), two dampings:

- "eigen" (default; the damping of EKFAC, George et al. 2018, with K-FAC's eigenvalues): the exact
  inverse of the damped Kronecker product, (G ⊗ A + γ I)⁻¹:
      M_l⁻¹ r = Q_G [ (Q_Gᵀ R Q_A) ⊘ (g aᵀ + γ) ] Q_Aᵀ;
  A has rank at most the curvature batch, so on layers wider than it only A's nonzero eigenvectors
  are kept (``_eigen_inverse``): the same inverse at a fraction of the cost;
- "pi" (π-damping, Martens & Grosse 2015 §6.3), π = √((tr A / dim A) / (tr G / dim G)):
      M_l⁻¹ r = (G + γ^½/π I)⁻¹ R (A + π γ^½ I)⁻¹,
  whose cross terms γ^½(π G ⊗ I + I ⊗ A/π) dwarf γ when γ is small, so it preconditions worse
  late in a run (measured in docs/benchmarks/optim.md).

``corrected=True`` gives EKFAC (George et al. 2018): the eigenbases stay K-FAC's, but the
Kronecker eigenvalues g aᵀ are replaced by the block's own second moments in that basis,

    s = Σ_i E_w[(Q_Gᵀ g_i)²] ((Q_Aᵀ ā_i)²)ᵀ      (out, in [+1]),

the diagonal of the Gauss-Newton block C_l rotated into Q_G ⊗ Q_A, which is the best diagonal
there (in Frobenius norm); M_l⁻¹ r = Q_G [(Q_Gᵀ R Q_A) ⊘ (s + γ)] Q_Aᵀ. It costs one projection of
the per-example rows onto the bases per refresh (the rows are kept until the bases are known).

Parameters outside every linear block are left unpreconditioned (M = 1 there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from toolkit.optim.distributed import mean_across

Samples = int | str  # a count of Monte-Carlo draws, or "exact"
KFAC_DAMPINGS: tuple[str, ...] = ("eigen", "pi")
_MAX_EXACT_OUTPUTS = 256  # per-example output Hessians are formed only up to this many outputs
_MAX_HESSIAN_ROWS = 256  # per-position blocks: square roots taken on at most this many positions
_LOW_RANK_TOL = 1e-4  # eigen damping: directions with g_i a_j < tol · γ are treated as g_i a_j = 0


@dataclass
class _Block:
    """One linear sublayer: its parameter slices in θ and the eigendecompositions of A and G."""

    module: nn.Linear
    weight: slice
    bias: slice | None
    out_features: int
    in_features: int
    eig_a: torch.Tensor | None = None  # (in+1,) or (in,)
    vec_a: torch.Tensor | None = None
    eig_g: torch.Tensor | None = None  # (out,)
    vec_g: torch.Tensor | None = None
    scale: torch.Tensor | None = None  # EKFAC's corrected eigenvalues s (out, in [+1]); None: g aᵀ


def linear_blocks(model: nn.Module, params: Sequence[torch.Tensor], offsets: Sequence[int]) -> list[_Block]:
    """The ``nn.Linear`` submodules whose weight is among ``params``, with their slices in θ.

    Args:
        model: the module.
        params: the optimized parameters in θ order.
        offsets: start of each parameter in θ (len(params) + 1 entries).

    Returns:
        One block per linear sublayer (a factorized layer gives two: V, then U, in module order).
    """
    index = {id(p): i for i, p in enumerate(params)}
    blocks = []
    for mod in model.modules():
        if not isinstance(mod, nn.Linear) or id(mod.weight) not in index:
            continue
        i = index[id(mod.weight)]
        bias = None
        if mod.bias is not None and id(mod.bias) in index:
            j = index[id(mod.bias)]
            bias = slice(offsets[j], offsets[j + 1])
        blocks.append(_Block(mod, slice(offsets[i], offsets[i + 1]), bias, mod.out_features, mod.in_features))
    return blocks


def block_forward(
    model: nn.Module, blocks: Sequence[_Block], inputs: tuple[Any, ...], who: str
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], torch.Tensor]:
    """One forward pass (with grad) recording every block's input and pre-activation output.

    Args:
        model: the module.
        blocks: its linear blocks (``linear_blocks``).
        inputs: the batch, ``model(*inputs)``.
        who: the caller's name, for the error message.

    Returns:
        (inputs, outputs, z): block index ↦ the sublayer's input (detached) and its output (in the
        graph), for the blocks on this batch's path; z the model's output.

    Raises:
        ValueError: the model returns more than one tensor.
    """
    acts: dict[int, torch.Tensor] = {}
    outs: dict[int, torch.Tensor] = {}
    handles = []
    for k, blk in enumerate(blocks):

        def hook(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor, k: int = k) -> None:
            acts[k] = args[0].detach()
            outs[k] = out

        handles.append(blk.module.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            z = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    leaves = tree_flatten(z)[0]
    if len(leaves) != 1:
        raise ValueError(f"{who}: expected a model with one output tensor, got {len(leaves)}")
    return acts, outs, leaves[0]


def _output_sqrt_hessians(
    loss_of_outputs: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    samples: Samples,
    generator: torch.Generator | None,
) -> list[torch.Tensor]:
    """Vectors w (each shaped like z) with Σ_w w wᵀ = H_L (exact) or E[w wᵀ] = H_L (per draw).

    H_L = ∂²L/∂z² of the batch loss is taken to be block-diagonal over the examples (the loss is a
    mean of per-example terms), which is what lets one probe per output coordinate recover every
    example's block at once. For outputs with a sequence axis, (B, T, ..., C), whose per-example
    Hessian is too large to form (a language model's T·V logits), the blocks are taken per row
    of the last axis (per position) when a random probe confirms that H_L is block-diagonal over
    them (a per-token loss); see ``_row_sqrt_hessians``.
    """
    z = z.detach()
    b = z.shape[0]
    flat = z.reshape(b, -1)  # (B, C)
    c_out = flat.shape[1]
    with torch.enable_grad():
        zz = z.clone().requires_grad_(True)
        (gz,) = torch.autograd.grad(loss_of_outputs(zz), zz, create_graph=True)

    def hvp(u: torch.Tensor) -> torch.Tensor:
        (h,) = torch.autograd.grad(gz, zz, u.view_as(z), retain_graph=True)
        return h.reshape(b, -1)  # (B, C)

    def draw(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=z.dtype, device="cpu").to(z.device)

    probe = draw(tuple(flat.shape))
    diag = hvp(torch.ones_like(flat))  # (B, C): the diagonal of each H_i if H_i is diagonal
    h_probe = hvp(probe)
    scale = float(diag.abs().max()) if diag.numel() else 0.0
    diagonal = bool((diag >= -1e-12 * scale).all()) and torch.allclose(
        h_probe, diag * probe, rtol=1e-4, atol=1e-12 + 1e-6 * scale
    )
    if diagonal:  # squared errors (H_i = c I), binary cross-entropy (diagonal H_i)
        root = diag.clamp_min(0).sqrt()  # (B, C)
        if samples == "exact":
            eye = torch.eye(c_out, dtype=z.dtype, device=z.device)
            return [(root * eye[k]).reshape(z.shape) for k in range(c_out)]
        return [(root * draw(tuple(flat.shape))).reshape(z.shape) for _ in range(int(samples))]
    if c_out > _MAX_EXACT_OUTPUTS and z.dim() > 2 and z.shape[-1] <= _MAX_EXACT_OUTPUTS:
        rows = _row_sqrt_hessians(hvp, z, samples, draw, generator)
        if rows is not None:
            return rows
    if c_out > _MAX_EXACT_OUTPUTS:
        raise ValueError(
            f"K-FAC: expected a diagonal output Hessian, at most {_MAX_EXACT_OUTPUTS} outputs per example "
            f"or a per-position loss over at most {_MAX_EXACT_OUTPUTS} outputs per position, "
            f"got {c_out} outputs with a non-isotropic loss Hessian"
        )
    eye = torch.eye(c_out, dtype=z.dtype, device=z.device)
    cols = [hvp(eye[k].expand(b, c_out).contiguous()) for k in range(c_out)]  # column k of each H_i
    h = torch.stack(cols, dim=2)  # (B, C, C)
    h = 0.5 * (h + h.transpose(1, 2))
    evals, evecs = torch.linalg.eigh(h)
    root = evecs * evals.clamp_min(0).sqrt().unsqueeze(1)  # (B, C, C): H_i^½ up to rotation
    if samples == "exact":
        return [root[:, :, k].reshape(z.shape) for k in range(c_out)]
    return [torch.einsum("bij,bj->bi", root, draw((b, c_out))).reshape(z.shape) for _ in range(int(samples))]


def _row_sqrt_hessians(
    hvp: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    samples: Samples,
    draw: Callable[[tuple[int, ...]], torch.Tensor],
    generator: torch.Generator | None,
) -> list[torch.Tensor] | None:
    """``_output_sqrt_hessians`` with one block per row of the last axis (per token); None if H_L isn't so.

    The C columns of every row's block come from C products with H_L (probe e_k in every row at
    once); a random probe then checks that H_L has no coupling between rows (a per-position loss
    such as next-token cross-entropy); otherwise None (the caller falls back to per-example blocks).
    The square roots (one C×C eigendecomposition per row) are taken on at most
    ``_MAX_HESSIAN_ROWS`` rows drawn without replacement, scaled by √(rows/drawn) so that Σ w wᵀ
    stays an unbiased estimate of H_L.
    """
    c = z.shape[-1]
    n_rows = z.numel() // c
    eye = torch.eye(c, dtype=z.dtype, device=z.device)
    cols = [hvp(eye[k].expand(z.shape).contiguous()).reshape(n_rows, c) for k in range(c)]
    h = torch.stack(cols, dim=2)  # (R, C, C): block of row r, if rows do not couple
    probe = draw((n_rows, c))
    direct = hvp(probe.reshape(z.shape)).reshape(n_rows, c)
    scale = float(direct.abs().max()) if direct.numel() else 0.0
    if not torch.allclose(direct, torch.einsum("rij,rj->ri", h, probe), rtol=1e-4, atol=1e-12 + 1e-6 * scale):
        return None
    rows = torch.arange(n_rows, device=z.device)
    weight = 1.0
    if n_rows > _MAX_HESSIAN_ROWS:
        rows = torch.randperm(n_rows, generator=generator)[:_MAX_HESSIAN_ROWS].to(z.device)
        weight = math.sqrt(n_rows / _MAX_HESSIAN_ROWS)
    hs = h[rows]
    hs = 0.5 * (hs + hs.transpose(1, 2))
    evals, evecs = torch.linalg.eigh(hs)
    root = weight * evecs * evals.clamp_min(0).sqrt().unsqueeze(1)  # (m, C, C)

    def place(vectors: torch.Tensor) -> torch.Tensor:  # (m, C) on the drawn rows, zero elsewhere
        w = torch.zeros(n_rows, c, dtype=z.dtype, device=z.device)
        w[rows] = vectors
        return w.reshape(z.shape)

    if samples == "exact":
        return [place(root[:, :, k]) for k in range(c)]
    return [place(torch.einsum("rij,rj->ri", root, draw((len(rows), c)))) for _ in range(int(samples))]


def _rotate(
    vec_a: torch.Tensor, vec_g: torch.Tensor, scale: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """R ↦ Q_G [(Q_Gᵀ R Q_A) ⊙ scale] Q_Aᵀ: a map diagonal in the full eigenbases."""
    return lambda mat: vec_g @ ((vec_g.T @ mat @ vec_a) * scale) @ vec_a.T


def _eigen_inverse(
    eig_a: torch.Tensor,
    vec_a: torch.Tensor,
    eig_g: torch.Tensor,
    vec_g: torch.Tensor,
    gamma: float,
    scale: torch.Tensor | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """R ↦ (Q (S + γ I) Qᵀ)⁻¹ R with Q = Q_G ⊗ Q_A, restricted to where S matters.

    S = diag(s), s = g aᵀ (K-FAC: the inverse of G ⊗ A + γ I) unless ``scale`` gives EKFAC's
    corrected s (out, in [+1]). (s + γ)⁻¹ = 1/γ − s / (γ (s + γ)), and the second term vanishes in
    every eigen-direction with s ≪ γ. A's rank is at most the curvature batch (B examples), so on a
    layer wider than B most of A's eigenvalues are zero, and s is 0 in those columns (both for
    g aᵀ and for EKFAC's s, whose column j sums the rows' squared projections on A's eigenvector
    j). Keeping only the columns j with max_i s_ij ≥ tol · γ (and the rows i with max_j s_ij ≥ tol · γ)
    gives

        M⁻¹ R = R / γ − Q_G' [(Q_G'ᵀ R Q_A') ⊙ s' / (γ (s' + γ))] Q_A'ᵀ,

    which costs out·in·r_a + out·r_g·r_a instead of out²·in + out·in², and differs from the exact
    inverse by a relative at most ``_LOW_RANK_TOL`` in every dropped eigen-direction (exactly 0 where
    s is 0). A side is truncated only when that keeps at most 3/4 of its dimension; with none
    truncated the exact formula of the module docstring is used.
    """
    s = eig_g[:, None] * eig_a[None, :] if scale is None else scale
    floor = _LOW_RANK_TOL * gamma
    keep_a = s.amax(dim=0) >= floor
    keep_g = s.amax(dim=1) >= floor
    cut_a = int(keep_a.sum()) <= 0.75 * len(eig_a)
    cut_g = int(keep_g.sum()) <= 0.75 * len(eig_g)
    if not (cut_a or cut_g):
        return _rotate(vec_a, vec_g, 1.0 / (s + gamma))
    if cut_a:
        s, vec_a = s[:, keep_a], vec_a[:, keep_a]
    if cut_g:
        s, vec_g = s[keep_g], vec_g[:, keep_g]
    corr = s / (gamma * (s + gamma))  # (r_g, r_a)
    return lambda mat: mat / gamma - vec_g @ ((vec_g.T @ (mat @ vec_a)) * corr) @ vec_a.T


class KFAC:
    """K-FAC blocks of the linear sublayers of a model; see the module docstring.

    Args:
        model: the module; its ``nn.Linear`` submodules whose weight is optimized become blocks.
        params: the optimized parameters in θ order.
        offsets: start of each parameter in θ (len(params) + 1 entries).
        samples: Monte-Carlo draws of w per example (≥ 1), or "exact" (C backward passes). The draws
            give G a rank of at most samples·B (B·T rows with a sequence axis); a layer wider than
            that gets exact zeros in G where the Gauss-Newton block has curvature, and the damped
            inverse then blows those directions up by 1/γ: with the former default of 1 draw on
            a 120-example curvature batch, the 400- and 784-wide layers of the benchmark's
            autoencoders made CG *slower* than without a preconditioner (docs/benchmarks/optim.md,
            section 4). The default, 16 draws, costs 16 backward passes per refresh.
        seed: seed of the draws.
        corrected: EKFAC: replace the Kronecker eigenvalues by the blocks' second moments in the
            Kronecker eigenbases (see the module docstring); "eigen" damping only.

    Raises:
        ValueError: ``samples`` is neither a positive count nor "exact".
    """

    def __init__(
        self, model: nn.Module, params: Sequence[torch.Tensor], offsets: Sequence[int],
        samples: Samples = 16, seed: int = 0, corrected: bool = False,
    ) -> None:  # fmt: skip
        if samples != "exact" and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
            raise ValueError(f"samples: expected a count >= 1 or 'exact', got {samples!r}")
        self.model = model
        self.samples = samples
        self.corrected = bool(corrected)
        self.blocks = linear_blocks(model, params, offsets)
        self.numel = int(offsets[-1])
        self.generator = torch.Generator().manual_seed(int(seed))

    @property
    def ready(self) -> bool:
        """Whether factors have been estimated."""
        return all(b.eig_a is not None for b in self.blocks)

    def factors(
        self, inputs: tuple[Any, ...], loss_of_outputs: Callable[[Any], torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Estimate (A, G) for every block on a batch (the model's current parameters).

        Args:
            inputs: the batch, ``model(*inputs)``.
            loss_of_outputs: outputs ↦ batch-mean loss on this batch.

        Returns:
            [(A, G)] in block order; A is (in+1, in+1) with a bias, else (in, in); G is (out, out).
        """
        return [(a, g) for a, g, _ in self._estimate(inputs, loss_of_outputs, keep_rows=False)]

    def _estimate(
        self, inputs: tuple[Any, ...], loss_of_outputs: Callable[[Any], torch.Tensor], keep_rows: bool
    ) -> list[tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, list[torch.Tensor]] | None]]:
        """[(A, G, rows)] per block; rows (with ``keep_rows``) = (ā rows (N, in'), g rows (N, out) per
        draw, each already scaled by √weight so that G = Σ_draws gᵀ g), else None."""
        if not self.blocks:
            return []
        acts, outs, z = block_forward(self.model, self.blocks, inputs, "K-FAC")
        live = [k for k in range(len(self.blocks)) if k in outs and outs[k].requires_grad]
        ws = [] if not live else _output_sqrt_hessians(loss_of_outputs, z, self.samples, self.generator)
        weight = 1.0 if self.samples == "exact" else 1.0 / max(len(ws), 1)
        g_sum: dict[int, torch.Tensor | None] = {k: None for k in live}
        g_rows: dict[int, list[torch.Tensor]] = {k: [] for k in range(len(self.blocks))}
        with torch.enable_grad():
            for n, w in enumerate(ws):
                grads = torch.autograd.grad(
                    z, [outs[k] for k in live], w, retain_graph=n + 1 < len(ws), allow_unused=True
                )
                for k, gk in zip(live, grads):
                    if gk is None:
                        continue
                    gk = gk.reshape(-1, gk.shape[-1])  # (B·T, out)
                    if keep_rows:
                        g_rows[k].append(gk * math.sqrt(weight))
                    term = weight * gk.T @ gk
                    prev = g_sum[k]
                    g_sum[k] = term if prev is None else prev + term
        result = []
        for k, blk in enumerate(self.blocks):
            if k not in acts:  # the sublayer is not on this batch's path: no curvature seen
                acts[k] = torch.zeros(1, blk.in_features, dtype=z.dtype, device=z.device)
            a = acts[k].reshape(-1, blk.in_features)  # (B·T, in)
            if blk.bias is not None:
                a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)  # (B·T, in+1)
            big_a = mean_across(a.T @ a / a.shape[0])
            g = g_sum.get(k)
            if g is None:
                g = torch.zeros(blk.out_features, blk.out_features, dtype=a.dtype, device=a.device)
            # rows beyond the batch axis (sequences): A averages them, G sums them ("expand")
            result.append((big_a, mean_across(g), (a, g_rows[k]) if keep_rows else None))
        return result

    def update(self, inputs: tuple[Any, ...], loss_of_outputs: Callable[[Any], torch.Tensor]) -> None:
        """Re-estimate the factors on a batch and store their eigendecompositions (and EKFAC's s)."""
        for blk, (a, g, rows) in zip(
            self.blocks, self._estimate(inputs, loss_of_outputs, keep_rows=self.corrected)
        ):
            ea, va = torch.linalg.eigh(a.double())
            eg, vg = torch.linalg.eigh(g.double())
            blk.eig_a, blk.vec_a = ea.clamp_min(0).to(a.dtype), va.to(a.dtype)
            blk.eig_g, blk.vec_g = eg.clamp_min(0).to(g.dtype), vg.to(g.dtype)
            blk.scale = None
            if rows is not None:
                a_rows, g_draws = rows
                pa = (a_rows @ blk.vec_a).square()  # (N, in'): the rows' squared coordinates in Q_A
                s = torch.zeros(g.shape[0], pa.shape[1], dtype=g.dtype, device=g.device)  # (out, in')
                for gk in g_draws:  # none for a block off this batch's path: s stays 0
                    s = s + (gk @ blk.vec_g).square().T @ pa
                blk.scale = mean_across(s)

    def inverse(
        self, damping: float, l2: torch.Tensor | None = None, mode: str = "eigen"
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """r ↦ M⁻¹ r with damped Kronecker blocks (see the module docstring).

        Args:
            damping: λ.
            l2: per-coordinate L2 coefficients (P,), or None; each block adds its mean to λ.
            mode: "eigen" (exact inverse of G ⊗ A + γ I) or "pi" (π-damped factors).

        Returns:
            The map (P,) -> (P,).

        Raises:
            RuntimeError: ``update`` was never called.
            ValueError: an unknown mode.
        """
        if mode not in KFAC_DAMPINGS:
            raise ValueError(f"mode: expected one of {list(KFAC_DAMPINGS)}, got {mode!r}")
        if mode == "pi" and self.corrected:
            raise ValueError("mode: π-damping damps Kronecker factors; EKFAC (corrected) takes 'eigen'")
        if not self.ready:
            raise RuntimeError("KFAC.inverse: call update() first")
        plans: list[tuple[_Block, Callable[[torch.Tensor], torch.Tensor]]] = []
        for blk in self.blocks:
            assert blk.eig_a is not None and blk.eig_g is not None
            assert blk.vec_a is not None and blk.vec_g is not None
            gamma = damping + (float(l2[blk.weight].mean()) if l2 is not None else 0.0)
            gamma = max(gamma, 1e-30)
            if mode == "eigen":
                plans.append(
                    (blk, _eigen_inverse(blk.eig_a, blk.vec_a, blk.eig_g, blk.vec_g, gamma, blk.scale))
                )
                continue
            tr_a = float(blk.eig_a.mean())
            tr_g = float(blk.eig_g.mean())
            pi = math.sqrt(tr_a / tr_g) if tr_a > 0 and tr_g > 0 else 1.0
            root = math.sqrt(gamma)
            inv_a = 1.0 / (blk.eig_a + pi * root)  # (in',)
            inv_g = 1.0 / (blk.eig_g + root / pi)  # (out,)
            plans.append((blk, _rotate(blk.vec_a, blk.vec_g, inv_g[:, None] * inv_a[None, :])))

        return blockwise(plans)


def blockwise(
    plans: Sequence[tuple[_Block, Callable[[torch.Tensor], torch.Tensor]]], outside: float = 1.0
) -> Callable[[torch.Tensor], torch.Tensor]:
    """r ↦ M⁻¹ r applied block by block on the (out, in [+1]) matrices [W b] of the blocks.

    Args:
        plans: (block, map of its (out, in [+1]) matrix) pairs.
        outside: the factor applied to the coordinates outside every block (1: left as they are).

    Returns:
        The map (P,) -> (P,).
    """

    def apply(r: torch.Tensor) -> torch.Tensor:
        out = r.clone() if outside == 1.0 else r * outside
        for blk, solve in plans:
            mat = r[blk.weight].view(blk.out_features, blk.in_features)
            if blk.bias is not None:
                mat = torch.cat([mat, r[blk.bias].view(-1, 1)], dim=1)  # (out, in+1)
            res = solve(mat)
            out[blk.weight] = res[:, : blk.in_features].reshape(-1)
            if blk.bias is not None:
                out[blk.bias] = res[:, -1]
        return out

    return apply
