"""Which runtime opens a model: ONNX Runtime or TensorRT, as the config says.

Apart from `backend` (the protocol both implement) so that neither implementation imports
the module that chooses between them.
"""

from __future__ import annotations

from edge.config import ModelsConfig
from edge.infer.backend import Backend, BackendError
from edge.infer.engines import EngineCache, tensorrt_module
from edge.infer.manifest import ModelSpec
from edge.infer.onnxruntime import OnnxRuntimeBackend

BACKENDS = ("onnxruntime", "tensorrt")


def open_backend(spec: ModelSpec, cfg: ModelsConfig) -> Backend:
    """Open `spec` with the backend `cfg.backend` names (heavy runtimes imported lazily)."""
    if cfg.backend == "onnxruntime":
        return OnnxRuntimeBackend(spec, intra_op_threads=cfg.intra_op_threads,
                                  providers=[*cfg.onnx_providers, "CPUExecutionProvider"])
    if cfg.backend == "tensorrt":
        tensorrt = tensorrt_module()  # BackendError in one line where TensorRT is missing
        plan = EngineCache(cfg.engine_cache, dla_core=cfg.dla_core).plan_for(
            spec, cfg.tensorrt_precision)
        backend: Backend = tensorrt.TensorRTBackend(spec, plan, max_batch=cfg.max_batch,
                                                    dla_core=cfg.dla_core)
        return backend
    raise BackendError(f"backend {cfg.backend!r} is unknown; expected one of {BACKENDS}")
