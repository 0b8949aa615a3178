"""One training step for each optimizer of the spec, behind a common `Stepper` interface.

``stepper.step(inputs, targets, curvature_inputs, curvature_targets) -> dict`` returns at least
``loss`` (the local batch mean before the step, averaged over processes), ``skipped`` (True when the
loss was not finite: nothing changed), and for Hessian-free ``damping``, ``cg_iters``, ``rho``,
``step_size``, ``accepted``, ``pruned``.

A batch whose loss is not finite is skipped on every process alike, and if a step leaves a
non-finite parameter the parameters and optimizer state from before the step are restored: such a
batch can neither crash nor corrupt a run.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from toolkit.errors import InputError
from toolkit.train import distributed as D
from toolkit.train.losses import LossFn


def _finite_params(params: list[nn.Parameter]) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


class Stepper:
    """Base class: holds the model, the loss, the trained parameters and the torch optimizer ``opt``."""

    name = "base"
    opt: Any

    def __init__(self, model: nn.Module, loss_fn: LossFn, params: list[nn.Parameter], cfg: Any) -> None:
        self.model, self.loss_fn, self.params, self.cfg = model, loss_fn, params, cfg
        self.device = params[0].device if params else torch.device("cpu")

    def _loss(self, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model(*inputs), targets)

    def _nonfinite(self, loss: torch.Tensor) -> bool:
        return D.any_true(not bool(torch.isfinite(loss.detach()).all()), self.device)

    def _mean(self, loss: torch.Tensor) -> float:
        return float(D.mean_(loss.detach().clone().reshape(1)).item())

    def step(
        self,
        inputs: tuple[torch.Tensor, ...],
        targets: torch.Tensor,
        curvature_inputs: tuple[torch.Tensor, ...] | None = None,
        curvature_targets: torch.Tensor | None = None,
    ) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return self.opt.state_dict()  # type: ignore[no-any-return]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state)

    def _snapshot(self, params: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """Copies of the parameters and the optimizer state, to roll a bad step back."""
        return [p.detach().clone() for p in params], copy.deepcopy(self.opt.state_dict())

    def _rollback(
        self, params: Sequence[torch.Tensor], snapshot: tuple[list[torch.Tensor], dict[str, Any]]
    ) -> None:
        """Restore the parameters and the optimizer state saved by ``_snapshot``."""
        before, state = snapshot
        with torch.no_grad():
            for p, b in zip(params, before):
                p.copy_(b)
        self.opt.load_state_dict(state)


class FirstOrder(Stepper):
    """adam / sgd (momentum) / lbfgs from torch.optim; ``regularizer.l2`` acts as 0.5·l2·‖w‖² in the loss."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, params: list[nn.Parameter], cfg: Any) -> None:
        super().__init__(model, loss_fn, params, cfg)
        self.name = cfg.name
        self.l2 = cfg.regularizer.l2
        if cfg.name == "adam":
            self.opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg.lr or 1e-3)
        elif cfg.name == "sgd":
            self.opt = torch.optim.SGD(params, lr=cfg.lr or 0.1, momentum=cfg.momentum)
        elif cfg.name == "lbfgs":
            self.opt = torch.optim.LBFGS(params, lr=cfg.lr or 1.0, max_iter=10, line_search_fn="strong_wolfe")
        else:
            raise InputError(f"unknown first-order optimizer {cfg.name!r}; known: adam, sgd, lbfgs")

    def _objective(self, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor) -> torch.Tensor:
        loss = self._loss(inputs, targets)
        if self.l2:
            loss = loss + 0.5 * self.l2 * sum(p.pow(2).sum() for p in self.params)
        return loss

    def step(
        self,
        inputs: tuple[torch.Tensor, ...],
        targets: torch.Tensor,
        curvature_inputs: tuple[torch.Tensor, ...] | None = None,
        curvature_targets: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        self.opt.zero_grad(set_to_none=True)
        loss = self._objective(inputs, targets)
        if self._nonfinite(loss):
            return {"loss": math.nan, "skipped": True}
        snapshot = self._snapshot(self.params)
        if isinstance(self.opt, torch.optim.LBFGS):

            def closure() -> torch.Tensor:
                self.opt.zero_grad(set_to_none=True)
                obj = self._objective(inputs, targets)
                obj.backward()
                D.average_gradients(self.params)
                return D.mean_(obj.detach().clone())

            self.opt.step(closure)
        else:
            loss.backward()
            D.average_gradients(self.params)
            self.opt.step()
        if D.any_true(not _finite_params(self.params), self.device):
            self._rollback(self.params, snapshot)
            return {"loss": math.nan, "skipped": True}
        return {"loss": self._mean(loss), "skipped": False}


def hf_hyper(cfg: Any, accepted: set[str]) -> dict[str, Any]:
    """Map the spec's OptimizerConfig to the keyword arguments HessianFree accepts (by name).

    Settings the spec leaves unset (None) are not passed, so HessianFree's defaults apply.
    """
    reg = cfg.regularizer
    candidates: dict[str, Any] = {
        "damping": cfg.damping,
        "cg_max_iters": cfg.cg_max_iters,
        "curvature": cfg.curvature,
        "preconditioner_alpha": cfg.preconditioner_alpha,
        "preconditioner": cfg.preconditioner,
        "kfac_every": cfg.kfac_every,
        "kfac_samples": cfg.kfac_samples,
        "nystrom_rank": cfg.nystrom_rank,
        "adaptive_cg": cfg.adaptive_cg,
        "jvp_mode": cfg.jvp_mode,
        "l2": reg.l2,
        "l1": reg.l1,
        "group_lasso": reg.group_lasso,
        "prune_threshold": reg.prune_threshold,
        "l2_on_bias": reg.l2_on_bias,
    }
    if cfg.lr is not None:
        candidates["lr"] = cfg.lr
    # None: the spec leaves the setting to HessianFree's own default
    return {k: v for k, v in candidates.items() if k in accepted and v is not None}


class HessianFreeStepper(Stepper):
    """toolkit.optim.HessianFree: Gauss-Newton curvature, CG, Levenberg-Marquardt damping, regularizers."""

    name = "hessian_free"

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, params: list[nn.Parameter], cfg: Any, all_params: bool
    ) -> None:
        super().__init__(model, loss_fn, params, cfg)
        try:
            from toolkit.optim import HessianFree
        except ImportError as exc:
            raise InputError(
                "optimizer 'hessian_free': toolkit.optim is not available in this build; "
                "use optimizer.name adam, sgd or lbfgs"
            ) from exc
        accepted = set(inspect.signature(HessianFree.__init__).parameters)
        self.opt = HessianFree(
            model, loss_fn, params=None if all_params else params, **hf_hyper(cfg, accepted)
        )

    def step(
        self,
        inputs: tuple[torch.Tensor, ...],
        targets: torch.Tensor,
        curvature_inputs: tuple[torch.Tensor, ...] | None = None,
        curvature_targets: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        with torch.no_grad():
            loss = self._loss(inputs, targets)
        if self._nonfinite(loss):
            return {"loss": math.nan, "skipped": True}
        params = list(self.model.parameters())
        snapshot = self._snapshot(params)
        info = self.opt.step(
            inputs, targets, curvature_inputs=curvature_inputs, curvature_targets=curvature_targets
        )
        now = list(self.model.parameters())
        if D.any_true(not _finite_params(now), self.device) or not math.isfinite(float(info.loss)):
            if [p.shape for p in now] == [p.shape for p in params]:  # not pruned in this step
                self._rollback(now, snapshot)
            return {"loss": math.nan, "skipped": True}
        return {
            "loss": float(info.data_loss),
            "objective": float(info.loss),
            "skipped": False,
            "damping": float(info.damping),
            "cg_iters": int(info.cg_iters),
            "chosen_iter": int(info.chosen_iter),
            "rho": float(info.rho),
            "step_size": float(info.step_size),
            "accepted": bool(info.accepted),
            "pruned": sum(len(v) for v in info.pruned.values()),
        }


def make_stepper(
    model: nn.Module, loss_fn: LossFn, params: list[nn.Parameter], cfg: Any, all_params: bool = True
) -> Stepper:
    """The Stepper for ``cfg.name`` (an OptimizerConfig).

    Args:
        model: the model (called as model(*inputs)).
        loss_fn: batch-mean loss(outputs, targets).
        params: the parameters to train (a subset when training one stage).
        cfg: the OptimizerConfig.
        all_params: whether ``params`` is every parameter of the model.

    Returns:
        The Stepper.

    Raises:
        ValueError: an unknown optimizer, or hessian_free without toolkit.optim.
    """
    if not params:
        raise InputError("expected at least one trainable parameter, got none")
    if cfg.name == "hessian_free":
        return HessianFreeStepper(model, loss_fn, params, cfg, all_params)
    return FirstOrder(model, loss_fn, params, cfg)
