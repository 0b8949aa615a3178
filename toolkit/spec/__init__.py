"""Graph specs: load (YAML / JSON, safe loaders only), validate, resolve stages and defaults.

```python
from toolkit.spec import load_spec, parse_spec, GraphSpec, SpecError
spec = load_spec("graphs/default.yaml")
```
"""

from toolkit.spec.errors import Problem, SpecError
from toolkit.spec.loader import json_schema, load_spec, parse_spec
from toolkit.spec.ops import OPS, OpDef
from toolkit.spec.schema import (
    AutoRule,
    AutoStages,
    Defaults,
    Factorize,
    GraphSpec,
    InputSpec,
    NodeSpec,
    parse_bytes,
)
from toolkit.spec.train_config import TrainConfig

__all__ = [
    "OPS",
    "AutoRule",
    "AutoStages",
    "Defaults",
    "Factorize",
    "GraphSpec",
    "InputSpec",
    "NodeSpec",
    "OpDef",
    "Problem",
    "SpecError",
    "TrainConfig",
    "json_schema",
    "load_spec",
    "parse_bytes",
    "parse_spec",
]
