"""Per-stage ONNX export: one checked, self-contained file per stage + fused.onnx + manifest.json.

from toolkit.export import export_model
manifest = export_model(model, "export/", sample={"x": x}, quantize=None, optimize=False)
"""

from toolkit.export.exporter import export_model
from toolkit.export.onnx_io import DEFAULT_OPSET
from toolkit.export.quantize import CANDIDATES, QuantSetting

__all__ = ["CANDIDATES", "DEFAULT_OPSET", "QuantSetting", "export_model"]
