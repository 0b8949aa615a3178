"""Dense weights -> factors: truncated SVD, activation-aware SVD, rank rules, global budget, refit.

```python
from toolkit.factorize import factorize_module
report = factorize_module(model, ratio=0.5, method="asvd", calibration=batches, refit=True)
console.print(report.table())
```
"""

from toolkit.factorize.budget import BudgetItem, allocate_budget
from toolkit.factorize.core import count_parameters, dense_layers, factorize_module, replace_module
from toolkit.factorize.refit import RefitOptions, lstsq_u, lstsq_v, refit_layer, relative_error
from toolkit.factorize.report import FactorizeReport, LayerReport
from toolkit.factorize.svd import (
    build_factorized,
    column_scale,
    layer_matrix,
    scaled_singular_values,
    svd_factors,
)

__all__ = [
    "BudgetItem",
    "FactorizeReport",
    "LayerReport",
    "RefitOptions",
    "allocate_budget",
    "build_factorized",
    "column_scale",
    "count_parameters",
    "dense_layers",
    "factorize_module",
    "layer_matrix",
    "lstsq_u",
    "lstsq_v",
    "refit_layer",
    "relative_error",
    "replace_module",
    "scaled_singular_values",
    "svd_factors",
]
