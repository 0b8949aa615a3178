"""rlhf toolkit: Reduced Large-scale Hidden Factorization + Regularized Learning with Hessian-Free optimization.

Pipeline: graph spec -> factorized torch model -> Hessian-free training -> per-stage ONNX -> onnxruntime.
"""

__version__ = "0.1.0"
