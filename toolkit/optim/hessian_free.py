"""The regularized Hessian-free (truncated Newton) optimizer.

One outer step at θ, on a gradient batch (inputs, targets) and a curvature batch (a slice of it):

1. F(θ) = L(θ) + R(θ) and g = ∇L + ∇R_smooth (L averaged across processes if distributed);
   with L1, g becomes the orthant-wise pseudo-gradient.
2. The damped curvature A = C + diag(λ + a) + H_group (C: Gauss-Newton, Hessian or Fisher on the
   curvature batch, linearized once; a: L2 coefficients; H_group: group-lasso curvature).
3. Preconditioned CG on A p = -g from 0.95·(previous CG solution), iterates kept on a 1.3-geometric
   grid. Preconditioner (``preconditioner``): "diagonal" (Martens: M = (d + λ + d_R)^α with d the
   mean squared per-example gradient), "kfac" (damped Kronecker-factored blocks of the linear
   sublayers, re-estimated every ``kfac_every`` steps on the curvature batch from ``kfac_samples``
   draws per example; ``toolkit.optim.kfac``), "ekfac" (the same eigenbases with the blocks' own
   second moments as eigenvalues, George et al. 2018), "nystrom" (a rank-``nystrom_rank`` randomized
   Nyström approximation of the whole undamped curvature, across layers, re-sketched every
   ``kfac_every`` steps; ``toolkit.optim.nystrom``) or "none". Adaptive budgets (``toolkit.optim.budgets``): the CG cap can start small and grow when
   CG runs into it (``adaptive_cg``), and the curvature batch can grow as the gradient's sampling
   noise falls below its size (``adaptive_curvature``).
4. Backtracking (Martens 2010): starting from the last iterate, step back along the grid while
   F (on the gradient batch) keeps decreasing; the chosen p gives
   ρ = (F(θ + p) - F(θ)) / (q(p) - q(0)) with q the undamped model, and λ follows Levenberg-Marquardt.
5. Armijo line search along p; with L1 every candidate is projected onto the orthant of θ.
   A non-finite F(θ) or gradient, or a search that finds no decrease, rejects the step: the
   parameters stay untouched and λ rises.
6. Group lasso: rank components of factorized layers whose norm fell under ``prune_threshold`` are
   removed with ``prune_ranks`` (the layers really shrink). The optimizer then *re-binds* itself: in
   every param group the old factor parameters are replaced by the new, smaller ones, and their
   per-parameter state (the warm-start slice) is cut to the kept components, so the same optimizer
   object keeps working. ``StepInfo.pruned`` lists the removed components per module name; callers
   holding references to the old parameters must refresh them (``model.parameters()``).

Resuming: ``state_dict()`` holds λ, the step counter, the curvature-batch offset, the RNG state,
the adaptive budgets, the K-FAC factors and per-parameter warm-start vectors; after ``load_state_dict`` a run continues exactly as it would have.
A model pruned before saving must be rebuilt with the pruned shapes before loading.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from toolkit.errors import InputError
from toolkit.layers import factorized_modules
from toolkit.optim.budgets import CGBudget, CurvatureBudget, gradient_noise
from toolkit.optim.cg import conjugate_gradient
from toolkit.optim.curvature import CURVATURES, JVP_MODES, curvature_operator
from toolkit.optim.damping import LevenbergMarquardt, armijo, reduction_ratio
from toolkit.optim.distributed import mean_across
from toolkit.optim.flat import FlatParams
from toolkit.optim.kfac import KFAC, KFAC_DAMPINGS
from toolkit.optim.nystrom import Nystrom
from toolkit.optim.preconditioner import preconditioner, squared_gradient_diagonal
from toolkit.optim.regularizers import Regularizer

LossFn = Callable[[Any, Any], torch.Tensor]
_GLOBAL = "hessian_free"
PRECONDITIONERS: tuple[str, ...] = ("none", "diagonal", "kfac", "ekfac", "nystrom")


@dataclass
class StepInfo:
    """Diagnostics of one outer step.

    Attributes:
        loss: F(θ) before the step (data loss + penalties) on the gradient batch.
        new_loss: F after the step (= loss when rejected).
        data_loss: the data term L(θ) before the step.
        rho: reduction ratio of the backtracked CG step (before the line search).
        damping: λ used by this step's CG.
        next_damping: λ after the Levenberg-Marquardt update.
        cg_iters: CG iterations (curvature-vector products).
        chosen_iter: CG iteration of the backtracked iterate.
        step_size: Armijo α (0 when rejected).
        accepted: whether the parameters changed.
        pruned: {module name: [removed component indices]} for this step.
        cg_reason: why CG stopped.
        grad_norm: ‖g‖ (pseudo-gradient with L1).
        seconds: wall time of the step.
    """

    loss: float
    new_loss: float
    data_loss: float
    rho: float
    damping: float
    next_damping: float
    cg_iters: int
    chosen_iter: int
    step_size: float
    accepted: bool
    pruned: dict[str, list[int]] = field(default_factory=dict)
    cg_reason: str = ""
    grad_norm: float = math.nan
    seconds: float = 0.0


def _check(name: str, value: float, low: float, high: float = math.inf, low_open: bool = False) -> None:
    ok = (value > low if low_open else value >= low) and value <= high
    if not ok or isinstance(value, bool) or not isinstance(value, (int, float)):
        side = "(" if low_open else "["
        raise InputError(f"{name}: expected a number in {side}{low}, {high}], got {value!r}")


class HessianFree(torch.optim.Optimizer):
    """Regularized Hessian-free optimizer (Martens 2010; Martens & Sutskever 2012).

    Minimizes F(θ) = L(θ) + ½ Σ a_j θ_j² + Σ c_j |θ_j| + μ Σ_k ‖θ_{G_k}‖ (see the module docstring
    for the algorithm and ``toolkit.optim.regularizers`` for the penalties). Each step: damped
    Gauss-Newton (or Hessian / Fisher) system  (C + diag(λ + a) + H_G) p = -g  solved by
    preconditioned CG, backtracked over CG iterates, Levenberg-Marquardt λ from ρ, Armijo line search.

    Args:
        model: the module; ``model(*inputs)`` gives the outputs.
        loss_fn: (outputs, targets) ↦ batch-mean loss, convex in the outputs.
        params: parameters or param groups (default ``model.parameters()``). Per group: ``l2``, ``l1``,
            ``l2_on_bias``; every other setting is global.
        curvature: "ggn" (Gauss-Newton, default), "hessian" or "fisher" (empirical Fisher).
        damping: initial λ > 0.
        cg_max_iters, cg_min_iters: CG iteration cap and the minimum before the progress rule. With
            ``adaptive_cg`` the cap grows from ``cg_initial_iters`` up to ``cg_max_iters`` (50: in the
            settings sweep of docs/benchmarks/optim.md, Martens' 250 spent the 20-s budget on long CG
            runs and left the three autoencoders 3-23% behind by validation loss; the classifier's CG
            runs stay below 30).
        cg_tol: ε of Martens' relative-progress rule.
        preconditioner: "diagonal" (Martens), "kfac" (Kronecker-factored blocks), "ekfac"
            (eigenvalue-corrected K-FAC), "nystrom" (randomized low-rank, across layers) or "none".
        preconditioner_alpha: α in [0, 1] of the diagonal preconditioner (0 disables it).
        kfac_every: outer steps between K-FAC factor estimates (or Nyström sketches).
        kfac_damping: "eigen" (exact inverse of the damped Kronecker block) or "pi" (π-damping).
        kfac_samples: Monte-Carlo draws per example for the K-FAC factor G (≥ 1), or "exact" (one
            backward pass per model output); see ``toolkit.optim.kfac.KFAC``.
        nystrom_rank: curvature products per Nyström sketch (the rank of the approximation).
        adaptive_cg: start the CG cap at ``cg_initial_iters`` (at most ``cg_max_iters``) and grow it
            after steps that run into it; else the cap is ``cg_max_iters``.
        cg_initial_iters: the first CG cap with ``adaptive_cg``.
        adaptive_curvature: grow the curvature batch from ``curvature_fraction`` up to
            ``curvature_max_fraction`` as the gradient's noise-to-signal ratio falls below 1
            (the gradient is then computed as two halves, to measure that ratio). Off by default:
            in the settings sweep of docs/benchmarks/optim.md a fixed fraction had the smaller
            worst case across the four problems.
        curvature_max_fraction: the upper bound of the adaptive curvature fraction.
        l2, l1: penalty coefficients; 1-D parameters (biases, norm scales) are excluded unless
            ``l2_on_bias`` (the rule applies to both penalties).
        group_lasso: μ over the rank components of the factorized layers in ``params``.
        prune_threshold: components with norm below it are pruned (group lasso only).
        l2_sp: L2-SP coefficient (per group too): ½ l2_sp ‖θ - θ⁰‖² with θ⁰ the parameters' values
            when the optimizer is built (the pretrained weights), every parameter including biases.
        line_search: Armijo line search on (else α = 1 when F decreases).
        curvature_fraction: curvature batch size / gradient batch size when no curvature batch is given
            (0.3: the best setting on the three autoencoders of the settings sweep in two runs of
            docs/benchmarks/optim.md, within 10% on the classifier; the former default was 0.1).
        curvature_sampling: "cycle" (contiguous slices that move by one slice each step) or "random".
        warm_start: decay of the previous CG solution used as the starting point (0 disables).
        jvp_mode: how J v is formed: "double_vjp" (default), "linearize" or "jvp"; see
            ``toolkit.optim.curvature``.
        seed: seed of the optimizer's own generator (random curvature batches).
        preconditioner_examples: use only the first this-many curvature-batch examples for the
            per-example statistics (None: all). Cheaper; under torch.distributed the equality with
            one process holds only with None.
        min_damping, max_damping: bounds on λ.

    Raises:
        ValueError, TypeError: invalid settings.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        params: Iterable[Any] | None = None,
        *,
        curvature: str = "ggn",
        damping: float = 1.0,
        cg_max_iters: int = 50,
        cg_min_iters: int = 10,
        cg_tol: float = 5e-4,
        preconditioner: str = "kfac",
        preconditioner_alpha: float = 0.75,
        kfac_every: int = 5,
        kfac_damping: str = "eigen",
        kfac_samples: int | str = 16,
        adaptive_cg: bool = True,
        cg_initial_iters: int = 10,
        adaptive_curvature: bool = False,
        curvature_max_fraction: float = 1.0,
        l2: float = 0.0,
        l1: float = 0.0,
        group_lasso: float = 0.0,
        prune_threshold: float = 1e-3,
        l2_on_bias: bool = False,
        line_search: bool = True,
        curvature_fraction: float = 0.3,
        curvature_sampling: str = "cycle",
        warm_start: float = 0.95,
        jvp_mode: str = "double_vjp",
        seed: int = 0,
        preconditioner_examples: int | None = None,
        min_damping: float = 1e-8,
        max_damping: float = 1e8,
        l2_sp: float = 0.0,
        nystrom_rank: int = 150,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(
                f"loss_fn: expected a callable (outputs, targets) -> loss, got {type(loss_fn).__name__}"
            )
        if curvature not in CURVATURES:
            raise InputError(f"curvature: expected one of {list(CURVATURES)}, got {curvature!r}")
        if curvature_sampling not in ("cycle", "random"):
            raise InputError(f"curvature_sampling: expected 'cycle' or 'random', got {curvature_sampling!r}")
        if preconditioner not in PRECONDITIONERS:
            raise InputError(
                f"preconditioner: expected one of {list(PRECONDITIONERS)}, got {preconditioner!r}"
            )
        if kfac_damping not in KFAC_DAMPINGS:
            raise InputError(f"kfac_damping: expected one of {list(KFAC_DAMPINGS)}, got {kfac_damping!r}")
        if preconditioner == "ekfac" and kfac_damping != "eigen":
            raise InputError(
                "kfac_damping: 'pi' damps Kronecker factors; preconditioner 'ekfac' takes 'eigen'"
            )
        if kfac_samples != "exact" and (
            isinstance(kfac_samples, bool) or not isinstance(kfac_samples, int) or kfac_samples < 1
        ):
            raise InputError(f"kfac_samples: expected a count >= 1 or 'exact', got {kfac_samples!r}")
        if jvp_mode not in JVP_MODES:
            raise InputError(f"jvp_mode: expected one of {list(JVP_MODES)}, got {jvp_mode!r}")
        for name, value, low, high, open_ in (
            ("damping", damping, 0.0, math.inf, True),
            ("cg_max_iters", cg_max_iters, 1, math.inf, False),
            ("cg_min_iters", cg_min_iters, 0, math.inf, False),
            ("cg_tol", cg_tol, 0.0, math.inf, False),
            ("preconditioner_alpha", preconditioner_alpha, 0.0, 1.0, False),
            ("l2", l2, 0.0, math.inf, False),
            ("l1", l1, 0.0, math.inf, False),
            ("group_lasso", group_lasso, 0.0, math.inf, False),
            ("l2_sp", l2_sp, 0.0, math.inf, False),
            ("prune_threshold", prune_threshold, 0.0, math.inf, False),
            ("curvature_fraction", curvature_fraction, 0.0, 1.0, True),
            ("kfac_every", kfac_every, 1, math.inf, False),
            ("nystrom_rank", nystrom_rank, 1, math.inf, False),
            ("cg_initial_iters", cg_initial_iters, 1, math.inf, False),
            ("curvature_max_fraction", curvature_max_fraction, curvature_fraction, 1.0, False),
            ("warm_start", warm_start, 0.0, 1.0, False),
            (
                "preconditioner_examples",
                1 if preconditioner_examples is None else preconditioner_examples,
                1,
                math.inf,
                False,
            ),
            ("min_damping", min_damping, 0.0, math.inf, True),
            ("max_damping", max_damping, min_damping, math.inf, False),
        ):
            _check(name, value, low, high, open_)
        self.model = model
        self.loss_fn = loss_fn
        defaults = {
            "curvature": curvature, "damping": float(damping), "cg_max_iters": int(cg_max_iters),
            "cg_min_iters": int(cg_min_iters), "cg_tol": float(cg_tol),
            "preconditioner_alpha": float(preconditioner_alpha), "l2": float(l2), "l1": float(l1),
            "group_lasso": float(group_lasso), "prune_threshold": float(prune_threshold),
            "l2_on_bias": bool(l2_on_bias), "line_search": bool(line_search),
            "curvature_fraction": float(curvature_fraction), "curvature_sampling": curvature_sampling,
            "warm_start": float(warm_start), "jvp_mode": jvp_mode, "seed": int(seed),
            "preconditioner_examples": preconditioner_examples, "l2_sp": float(l2_sp),
            "preconditioner": preconditioner,
            "kfac_every": int(kfac_every), "kfac_damping": kfac_damping,
            "kfac_samples": kfac_samples, "adaptive_cg": bool(adaptive_cg), "nystrom_rank": int(nystrom_rank),
            "cg_initial_iters": int(cg_initial_iters), "adaptive_curvature": bool(adaptive_curvature),
            "curvature_max_fraction": float(curvature_max_fraction),
        }  # fmt: skip
        super().__init__(list(model.parameters()) if params is None else params, defaults)
        FlatParams(model, self._params())  # every parameter must belong to the model
        self._lm = LevenbergMarquardt(min_damping=min_damping, max_damping=max_damping)
        self._generator = torch.Generator().manual_seed(int(seed))
        self.state[_GLOBAL] = {"damping": float(damping), "step": 0, "curvature_offset": 0}  # type: ignore[index]
        for group in self.param_groups:  # L2-SP anchors θ⁰ (per-parameter state: saved, pruned with it)
            if group["l2_sp"] > 0:
                for p in group["params"]:
                    self.state[p]["l2_sp_anchor"] = p.detach().clone()
        self._cg_budget = CGBudget(
            min(int(cg_initial_iters), int(cg_max_iters)) if adaptive_cg else int(cg_max_iters),
            int(cg_max_iters),
        )
        self._curv_budget = CurvatureBudget(float(curvature_fraction), float(curvature_max_fraction))
        self._global().update(cg_cap=self._cg_budget.cap, noise=math.nan)

    # ----------------------------------------------------------------- state
    def _global(self) -> dict[str, Any]:
        """The optimizer-wide state (λ, counters, RNG), kept in ``self.state`` under a string key."""
        return self.state[_GLOBAL]  # type: ignore[index]

    @property
    def damping(self) -> float:
        """The current Levenberg-Marquardt λ."""
        return float(self._global()["damping"])

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict[str, Any]:
        """torch.optim state plus λ, counters, the generator state and warm-start vectors."""
        self._global()["rng"] = self._generator.get_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from ``state_dict()``; the run continues exactly."""
        super().load_state_dict(state_dict)
        g = self._global()
        if "rng" in g:
            self._generator.set_state(g["rng"].cpu() if isinstance(g["rng"], torch.Tensor) else g["rng"])
        if "cg_cap" in g:
            self._cg_budget.load_state_dict({"cap": g["cg_cap"]})
        if "noise" in g:
            self._curv_budget.load_state_dict({"noise": g["noise"]})

    # --------------------------------------------------------------- helpers
    def _regularizer(self, flat: FlatParams, like: torch.Tensor) -> Regularizer:
        l2 = torch.zeros_like(like)
        l1 = torch.zeros_like(like)
        sp, anchor = torch.zeros_like(like), torch.zeros_like(like)
        index = {id(p): i for i, p in enumerate(flat.params)}
        for group in self.param_groups:
            for p in group["params"]:
                if group["l2_sp"] > 0:
                    sl = flat.slice_of(index[id(p)])
                    sp[sl] = group["l2_sp"]
                    theta0 = self.state[p].setdefault("l2_sp_anchor", p.detach().clone())
                    anchor[sl] = theta0.reshape(-1).to(like)
                if p.dim() <= 1 and not group["l2_on_bias"]:
                    continue
                sl = flat.slice_of(index[id(p)])
                l2[sl] = group["l2"]
                l1[sl] = group["l1"]
        mu = self.defaults["group_lasso"]
        pos: list[torch.Tensor] = []
        gid: list[torch.Tensor] = []
        n_groups = 0
        if mu > 0:
            for mod in factorized_modules(self.model).values():
                factors = mod.rank_factors()
                if not all(id(p) in index for p, _ in factors):
                    continue
                r = mod.rank
                for p, dim in factors:
                    i = index[id(p)]
                    ids = torch.arange(p.numel(), device=like.device).view(p.shape)
                    comp = (
                        torch.arange(r, device=like.device)
                        .view([r if d == dim else 1 for d in range(p.dim())])
                        .expand(p.shape)
                    )
                    pos.append(ids.reshape(-1) + flat.offsets[i])
                    gid.append(comp.reshape(-1) + n_groups)
                n_groups += r
        if n_groups:
            return Regularizer(l2, l1, mu, torch.cat(pos), torch.cat(gid), n_groups, l2_sp=sp, anchor=anchor)
        return Regularizer(l2, l1, l2_sp=sp, anchor=anchor)

    def _curvature_batch(self, inputs: tuple[Any, ...], targets: Any) -> tuple[tuple[Any, ...], Any]:
        batch = int(inputs[0].shape[0])
        m = max(1, math.ceil(self._curv_budget.current() * batch))
        if m >= batch:
            return inputs, targets
        g = self._global()
        if self.defaults["curvature_sampling"] == "random":
            idx = torch.randperm(batch, generator=self._generator)[:m]
        else:
            start = int(g["curvature_offset"]) % batch
            idx = (torch.arange(m) + start) % batch
            g["curvature_offset"] = (start + m) % batch
        idx = idx.to(inputs[0].device)
        return tree_map(lambda a: a.index_select(0, idx), inputs), tree_map(
            lambda a: a.index_select(0, idx), targets
        )

    def _prune(self, reg_mu: float) -> dict[str, list[int]]:
        """Remove rank components under the threshold and re-bind params/state to the new tensors."""
        pruned: dict[str, list[int]] = {}
        if reg_mu <= 0:
            return pruned
        owned = {id(p) for p in self._params()}
        threshold = self.defaults["prune_threshold"]
        replace: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}
        for name, mod in factorized_modules(self.model).items():
            old = mod.rank_factors()
            if not all(id(p) in owned for p, _ in old):
                continue
            norms = mod.component_norms()
            keep = torch.nonzero(norms >= threshold).flatten()
            if keep.numel() == norms.numel():
                continue
            if keep.numel() == 0:
                keep = norms.argmax().view(1)
            removed = sorted(set(range(norms.numel())) - set(keep.tolist()))
            mod.prune_ranks(keep)
            for (p_old, dim), (p_new, _) in zip(old, mod.rank_factors()):
                replace[id(p_old)] = (p_new, dim, keep)
            pruned[name] = removed
        if not replace:
            return pruned
        for group in self.param_groups:
            new_params = []
            for p in group["params"]:
                if id(p) not in replace:
                    new_params.append(p)
                    continue
                p_new, dim, keep = replace[id(p)]
                st = self.state.pop(p, None)
                if st:
                    self.state[p_new] = {
                        k: v.index_select(dim, keep.to(v.device))
                        if isinstance(v, torch.Tensor) and v.shape == p.shape
                        else v
                        for k, v in st.items()
                    }
                new_params.append(p_new)
            group["params"] = new_params
        return pruned

    def _halves_gradient(
        self, flat: FlatParams, theta0: torch.Tensor, inputs: tuple[Any, ...], targets: Any
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Batch loss, gradient and noise ratio ν from the gradients of the batch's two halves."""
        batch = int(inputs[0].shape[0])
        n1 = batch // 2
        losses, grads = [], []
        for rows in (slice(0, n1), slice(n1, batch)):
            x = tree_map(lambda a, rows=rows: a[rows], inputs)
            t = tree_map(lambda a, rows=rows: a[rows], targets)
            with torch.enable_grad():
                th = theta0.clone().requires_grad_(True)
                loss = self.loss_fn(flat.function(x)(th), t)
                (gr,) = torch.autograd.grad(loss, th, allow_unused=True)
            losses.append(loss.detach())
            grads.append(torch.zeros_like(theta0) if gr is None else gr)
        n2 = batch - n1
        data_t = (n1 * losses[0] + n2 * losses[1]) / batch
        g1, g2 = mean_across(grads[0]), mean_across(grads[1])
        return data_t, (n1 * grads[0] + n2 * grads[1]) / batch, gradient_noise(g1, g2, n1, n2)

    def _kfac(
        self, flat: FlatParams, inputs: tuple[Any, ...], loss_of_outputs: Callable[[Any], torch.Tensor]
    ) -> KFAC:
        """The K-FAC blocks at θ, re-estimated every ``kfac_every`` steps (or when shapes changed)."""
        g = self._global()
        corrected = self.defaults["preconditioner"] == "ekfac"
        kfac = KFAC(
            self.model, flat.params, flat.offsets, samples=self.defaults["kfac_samples"], corrected=corrected
        )
        kfac.generator = self._generator
        saved = g.get("kfac")
        fresh = (
            saved is not None
            and len(saved) == len(kfac.blocks)
            and all(
                len(s) == 4 + corrected
                and tuple(s[1].shape) == (b.in_features + (b.bias is not None),) * 2
                and tuple(s[3].shape) == (b.out_features,) * 2
                for s, b in zip(saved, kfac.blocks)
            )
        )
        if fresh and g["step"] - int(g.get("kfac_step", -(10**9))) < self.defaults["kfac_every"]:
            assert saved is not None
            for blk, (ea, va, eg, vg, *scale) in zip(kfac.blocks, saved):
                blk.eig_a, blk.vec_a, blk.eig_g, blk.vec_g = ea, va, eg, vg
                blk.scale = scale[0] if scale else None
            return kfac
        with torch.enable_grad():
            kfac.update(inputs, loss_of_outputs)
        g["kfac"] = [
            [b.eig_a, b.vec_a, b.eig_g, b.vec_g] + ([b.scale] if corrected else []) for b in kfac.blocks
        ]
        g["kfac_step"] = int(g["step"])
        return kfac

    def _nystrom(self, curvature: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor) -> Nystrom:
        """The Nyström sketch of the undamped curvature, re-taken every ``kfac_every`` steps (or on a new size)."""
        g = self._global()
        sketch = Nystrom(self.defaults["nystrom_rank"])
        sketch.generator = self._generator
        saved = g.get("nystrom")
        if (
            saved is not None
            and saved[0].shape[0] == theta.numel()
            and g["step"] - int(g.get("nystrom_step", -(10**9))) < self.defaults["kfac_every"]
        ):
            sketch.vectors, sketch.values = saved
            return sketch
        sketch.update(curvature, theta)
        g["nystrom"] = [sketch.vectors, sketch.values]
        g["nystrom_step"] = int(g["step"])
        return sketch

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        inputs: tuple[Any, ...] | torch.Tensor,
        targets: Any,
        curvature_inputs: tuple[Any, ...] | torch.Tensor | None = None,
        curvature_targets: Any = None,
    ) -> StepInfo:
        """One outer Hessian-free step (see the module docstring).

        Args:
            inputs: tuple of tensors for ``model(*inputs)`` (a single tensor is accepted), batch first.
            targets: what ``loss_fn`` takes as targets for this batch.
            curvature_inputs, curvature_targets: a separate curvature batch; default a slice of
                ``curvature_fraction`` of the gradient batch, cycled across steps.

        Returns:
            StepInfo.

        Raises:
            TypeError: inputs are not tensors.
            ValueError: only one of curvature_inputs / curvature_targets is given.
        """
        t_start = time.perf_counter()
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        if isinstance(curvature_inputs, torch.Tensor):
            curvature_inputs = (curvature_inputs,)
        if (
            not isinstance(inputs, tuple)
            or not inputs
            or not all(isinstance(x, torch.Tensor) for x in inputs)
        ):
            raise TypeError(f"inputs: expected a tuple of tensors, got {type(inputs).__name__}")
        if (curvature_inputs is None) != (curvature_targets is None):
            raise InputError("expected both curvature_inputs and curvature_targets, or neither")
        hp = self.defaults
        g_state = self._global()
        lam = float(g_state["damping"])
        flat = FlatParams(self.model, self._params())
        theta0 = flat.flatten()
        reg = self._regularizer(flat, theta0)
        loss_fn = self.loss_fn
        fn = flat.function(inputs)

        def objective(theta: torch.Tensor) -> float:
            data = mean_across(loss_fn(fn(theta), targets).detach())
            return float(data + reg.value(theta))

        def reject(
            loss: float, data: float, reason: str, cg_iters: int = 0, chosen: int = 0, rho: float = -math.inf
        ) -> StepInfo:
            new_lam = self._lm.update(lam, -math.inf)
            g_state["damping"] = new_lam
            g_state["step"] += 1
            return StepInfo(loss, loss, data, rho, lam, new_lam, cg_iters, chosen, 0.0, False,
                            cg_reason=reason, seconds=time.perf_counter() - t_start)  # fmt: skip

        # 1. loss and gradient on the gradient batch (as two halves when measuring the noise)
        batch = int(inputs[0].shape[0])
        noise = math.nan
        if hp["adaptive_curvature"] and curvature_inputs is None and batch >= 2:
            data_t, grad_data, noise = self._halves_gradient(flat, theta0, inputs, targets)
        else:
            with torch.enable_grad():
                th = theta0.clone().requires_grad_(True)
                data_t = loss_fn(fn(th), targets)
                (grad_data,) = torch.autograd.grad(data_t, th, allow_unused=True)
        if grad_data is None:
            grad_data = torch.zeros_like(theta0)
        data_loss = float(mean_across(data_t.detach()))
        grad_data = mean_across(grad_data)
        f0 = data_loss + float(reg.value(theta0))
        if not math.isfinite(f0) or not bool(torch.isfinite(grad_data).all()):
            return reject(f0, data_loss, "non-finite loss or gradient")
        g = grad_data + reg.smooth_grad(theta0)
        pg = reg.pseudo_gradient(theta0, g)

        # 2. curvature on its own batch
        if math.isfinite(noise):
            self._curv_budget.observe(noise)
            g_state["noise"] = self._curv_budget.noise
        if curvature_inputs is None:
            c_inputs, c_targets = self._curvature_batch(inputs, targets)
        else:
            c_inputs, c_targets = curvature_inputs, curvature_targets
        with torch.enable_grad():
            op = curvature_operator(
                flat.function(c_inputs), lambda z: loss_fn(z, c_targets), theta0,
                kind=hp["curvature"], jvp_mode=hp["jvp_mode"],
            )  # fmt: skip
        pieces = reg.curvature_product(theta0)

        def damped(v: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                cv = op(v)
            return cv + lam * v + reg.apply_curvature(pieces, v)

        # 3. preconditioned CG from the warm start
        precond: Any = None
        if hp["preconditioner"] in ("kfac", "ekfac"):

            def loss_of_outputs(z: Any) -> torch.Tensor:
                return loss_fn(z, c_targets)

            precond = self._kfac(flat, c_inputs, loss_of_outputs).inverse(lam, reg.l2, hp["kfac_damping"])
        elif hp["preconditioner"] == "nystrom":

            def curvature(v: torch.Tensor) -> torch.Tensor:
                with torch.enable_grad():
                    cv = op(v)
                return cv + reg.apply_curvature(pieces, v)

            precond = self._nystrom(curvature, theta0).inverse(lam)
        elif hp["preconditioner"] == "diagonal" and hp["preconditioner_alpha"] > 0:
            k = hp["preconditioner_examples"]
            p_inputs, p_targets = c_inputs, c_targets
            if k is not None and k < int(c_inputs[0].shape[0]):
                p_inputs = tree_map(lambda a: a[:k], c_inputs)
                p_targets = tree_map(lambda a: a[:k], c_targets)
            with torch.enable_grad():
                diag = squared_gradient_diagonal(
                    lambda t, x: flat.function(x)(t), loss_fn, theta0, p_inputs, p_targets
                )
            precond = preconditioner(diag, lam + reg.curvature_diag(theta0), hp["preconditioner_alpha"])
        x0 = None
        if hp["warm_start"] > 0:
            prev = [self.state[p].get("cg_prev") for p in flat.params]
            if any(v is not None for v in prev):
                x0 = hp["warm_start"] * flat.flatten(
                    [v if v is not None else torch.zeros_like(p) for v, p in zip(prev, flat.params)]
                )
        res = conjugate_gradient(
            damped, -pg, x0=x0, preconditioner=precond, max_iters=self._cg_budget.cap,
            min_iters=hp["cg_min_iters"], tol=hp["cg_tol"],
        )  # fmt: skip
        for p, v in zip(flat.params, res.x.split(flat.sizes)):
            self.state[p]["cg_prev"] = v.view_as(p).clone()

        xi = reg.orthant(theta0, pg)

        def point(p: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
            return reg.project_point(theta0 + alpha * p, xi)

        # 4. backtrack over the kept iterates, by F on the gradient batch
        cands = [(i, reg.project_direction(x, pg), q, x) for i, x, q in res.iterates if i > 0]
        if not cands:
            return reject(f0, data_loss, res.reason, res.iters)
        j = len(cands) - 1
        f_best = objective(point(cands[j][1]))
        f_best = f_best if math.isfinite(f_best) else math.inf
        while j > 0:
            f_prev = objective(point(cands[j - 1][1]))
            if not (math.isfinite(f_prev) and f_prev < f_best):
                break
            j, f_best = j - 1, f_prev
        chosen_iter, p, q_damped, x_raw = cands[j]
        predicted = q_damped - 0.5 * lam * float(x_raw.dot(x_raw))  # undamped model q(p) - q(0)
        rho = reduction_ratio(f_best, f0, predicted)
        new_lam = self._lm.update(lam, rho)
        if hp["adaptive_cg"]:
            g_state["cg_cap"] = self._cg_budget.update(res.iters, res.reason, rho)

        # 5. line search
        slope = float(pg.dot(p))
        if hp["line_search"]:
            alpha, f_new = armijo(lambda a: objective(point(p, a)), f0, slope, f_at_one=f_best)
        else:
            alpha, f_new = (1.0, f_best) if f_best < f0 else (0.0, f0)
        if alpha == 0.0:
            g_state["damping"] = max(new_lam, self._lm.update(lam, -math.inf))
            g_state["step"] += 1
            return StepInfo(f0, f0, data_loss, rho, lam, g_state["damping"], res.iters, chosen_iter, 0.0, False,
                            cg_reason=res.reason, grad_norm=float(pg.norm()),
                            seconds=time.perf_counter() - t_start)  # fmt: skip
        flat.write(point(p, alpha))
        g_state["damping"] = new_lam
        g_state["step"] += 1

        # 6. group-lasso pruning, then re-binding
        pruned = self._prune(reg.mu if reg.has_group else 0.0)
        return StepInfo(
            f0, f_new, data_loss, rho, lam, new_lam, res.iters, chosen_iter, alpha, True, pruned,
            cg_reason=res.reason, grad_norm=float(pg.norm()), seconds=time.perf_counter() - t_start,
        )  # fmt: skip
