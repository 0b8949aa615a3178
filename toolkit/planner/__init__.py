"""Placement planner: split a model's chain of units into pipeline stages and put each on a device.

Pure functions over a measured :class:`ModelProfile` and a :class:`Cluster` (devices, links): no
torch, no Ray, no onnxruntime here (measuring a profile lives in ``toolkit.planner.measure``).

```python
from toolkit.planner import load_devices, plan_pipeline, ModelProfile
cluster = load_devices("devices.yaml")
plan = plan_pipeline(profile, cluster, objective="throughput")
plan.bottleneck_s, plan.throughput, plan.latency_s, plan.lower_bound_s
```
"""

from toolkit.planner.devices import Cluster, Device, Hop, Link, load_devices, parse_devices
from toolkit.planner.dp import Plan, Stage, evaluate, lower_bound, plan_least_lowering, plan_pipeline
from toolkit.planner.profile import ModelProfile, Unit

__all__ = [
    "Cluster",
    "Device",
    "Hop",
    "Link",
    "ModelProfile",
    "Plan",
    "Stage",
    "Unit",
    "evaluate",
    "load_devices",
    "lower_bound",
    "parse_devices",
    "plan_least_lowering",
    "plan_pipeline",
]
