"""onnxruntime executor for export directories: numpy + onnxruntime + stdlib only, never torch.

from toolkit.runtime import Executor
ex = Executor("export/", providers="auto", memory_budget=None)
outputs = ex.run({"x": x})        # dict name -> np.ndarray
"""

from toolkit.runtime.executor import Executor
from toolkit.runtime.manifest import Manifest, TensorInfo, read_manifest, safe_path, sha256_file
from toolkit.runtime.session import SessionConfig

__all__ = ["Executor", "Manifest", "SessionConfig", "TensorInfo", "read_manifest", "safe_path", "sha256_file"]
