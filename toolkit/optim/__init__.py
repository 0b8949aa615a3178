"""Regularized Hessian-free optimization: curvature products, CG, damping, regularizers, optimizer."""

from toolkit.optim.cg import CGResult, conjugate_gradient
from toolkit.optim.curvature import curvature_operator
from toolkit.optim.damping import LevenbergMarquardt, armijo, reduction_ratio
from toolkit.optim.hessian_free import HessianFree, StepInfo
from toolkit.optim.preconditioner import preconditioner, squared_gradient_diagonal
from toolkit.optim.regularizers import Regularizer

__all__ = [
    "CGResult",
    "HessianFree",
    "LevenbergMarquardt",
    "Regularizer",
    "StepInfo",
    "armijo",
    "conjugate_gradient",
    "curvature_operator",
    "preconditioner",
    "reduction_ratio",
    "squared_gradient_diagonal",
]
