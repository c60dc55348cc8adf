"""ONNX Runtime backend: CPU by default, CUDA / TensorRT execution providers when installed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import structlog

from edge.infer.backend import BackendError, Tensor
from edge.infer.manifest import ModelSpec, verify_file, verify_io

log = structlog.get_logger(__name__)

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16",
               "tensor(int64)": "int64", "tensor(uint8)": "uint8"}
CPU = "CPUExecutionProvider"


def choose_providers(available: Sequence[str], preferred: Sequence[str] | None) -> list[str]:
    """The providers to ask for: `preferred` filtered by what is installed, CPU always last."""
    wanted = list(preferred) if preferred is not None else [CPU]
    chosen = [p for p in wanted if p in available and p != CPU]
    return [*chosen, CPU]


class OnnxRuntimeBackend:
    """One ONNX model in an `onnxruntime.InferenceSession`.

    Verifies the file's sha256 and the session's input/output names and
    shapes against the manifest before the first run.
    """

    def __init__(self, spec: ModelSpec, *, intra_op_threads: int = 1,
                 providers: Sequence[str] | None = None) -> None:
        import onnxruntime as ort  # loaded with the first model, not with the package

        verify_file(spec)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        use = choose_providers(ort.get_available_providers(), providers)
        try:
            self._session = ort.InferenceSession(str(spec.path), sess_options=opts, providers=use)
        except Exception as exc:  # ORT raises its own exception types per failure
            raise BackendError(f"{spec.path}: ONNX Runtime cannot load it ({exc})") from exc
        verify_io(spec, self._describe(self._session.get_inputs()),
                  self._describe(self._session.get_outputs()))
        self._spec = spec
        self._outputs = [t.name for t in spec.outputs]
        log.info("model_loaded", model=spec.name, version=spec.version, backend="onnxruntime",
                 providers=self._session.get_providers(), threads=intra_op_threads)

    @staticmethod
    def _describe(args: Sequence[object]) -> list[tuple[str, list[int | str | None], str]]:
        out: list[tuple[str, list[int | str | None], str]] = []
        for a in args:
            ort_type = str(getattr(a, "type", ""))
            out.append((str(getattr(a, "name", "")), list(getattr(a, "shape", [])),
                        _ORT_DTYPES.get(ort_type, ort_type)))
        return out

    @property
    def name(self) -> str:
        return "onnxruntime"

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers())

    def run(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        feed = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()}
        try:
            results = self._session.run(self._outputs, feed)
        except Exception as exc:
            raise BackendError(f"{self._spec.name}: inference failed ({exc})") from exc
        return {k: np.asarray(v, dtype=np.float32) for k, v in zip(self._outputs, results,
                                                                    strict=True)}

    def close(self) -> None:
        del self._session
