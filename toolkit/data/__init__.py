"""Data for `rlhf train`: built-in datasets that ship offline, the user's own files, splits, batches.

```python
from toolkit.data import load_data
splits = load_data(spec.train.data, spec.inputs)       # Splits(train, val, test)
splits.train.inputs["x"].shape, splits.train.targets.shape
```
"""

from toolkit.data.batching import batch_order, curvature_subset, shard_batch
from toolkit.data.builtin import BUILTIN_DATASETS, curves_dataset, load_builtin
from toolkit.data.checks import check_targets
from toolkit.data.files import load_file
from toolkit.data.splits import Split, Splits, load_data, split_arrays

__all__ = [
    "BUILTIN_DATASETS",
    "Split",
    "Splits",
    "batch_order",
    "check_targets",
    "curvature_subset",
    "curves_dataset",
    "load_builtin",
    "load_data",
    "load_file",
    "shard_batch",
    "split_arrays",
]
