"""The inference backend protocol: one opened model, named float32 tensors in and out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from edge.config import ModelsConfig
    from edge.infer.manifest import ModelSpec

Tensor = npt.NDArray[np.float32]
BACKENDS = ("onnxruntime", "tensorrt")


class BackendError(RuntimeError):
    """A backend cannot be opened or run (missing runtime, bad engine, device error)."""


class Backend(Protocol):
    """One loaded model. `run` takes a batch (first axis) of every input."""

    @property
    def name(self) -> str: ...

    @property
    def spec(self) -> ModelSpec: ...

    def run(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]: ...

    def close(self) -> None: ...


def open_backend(spec: ModelSpec, cfg: ModelsConfig) -> Backend:
    """Open `spec` with the backend `cfg.backend` names (heavy runtimes imported lazily)."""
    if cfg.backend == "onnxruntime":
        from edge.infer.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(spec, intra_op_threads=cfg.intra_op_threads,
                                  providers=[*cfg.onnx_providers, "CPUExecutionProvider"])
    if cfg.backend == "tensorrt":
        from edge.infer.engines import EngineCache
        from edge.infer.tensorrt import TensorRTBackend

        plan = EngineCache(cfg.engine_cache).plan_for(spec, cfg.tensorrt_precision)
        return TensorRTBackend(spec, plan, max_batch=cfg.max_batch)
    raise BackendError(f"backend {cfg.backend!r} is unknown; expected one of {BACKENDS}")
