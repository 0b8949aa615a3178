"""The ceilings of :mod:`toolkit.limits`, under the spec package too (same objects; no torch)."""

from toolkit.limits import (
    BYTES_PER_PARAM,
    LIMITS,
    MAX_AUTO_STAGES,
    MAX_MODEL_PARAMS,
    MAX_NODE_PARAMS,
    MAX_SPEC_BYTES,
    MAX_SPEC_DEPTH,
    MAX_SPEC_VALUES,
    MAX_TENSOR_ELEMENTS,
    check,
    check_params,
    check_shape,
    describe,
    limit,
    numel,
    over,
)

__all__ = [
    "BYTES_PER_PARAM",
    "LIMITS",
    "MAX_AUTO_STAGES",
    "MAX_MODEL_PARAMS",
    "MAX_NODE_PARAMS",
    "MAX_SPEC_BYTES",
    "MAX_SPEC_DEPTH",
    "MAX_SPEC_VALUES",
    "MAX_TENSOR_ELEMENTS",
    "check",
    "check_params",
    "check_shape",
    "describe",
    "limit",
    "numel",
    "over",
]
