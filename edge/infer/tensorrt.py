"""TensorRT backend and builder: plans built from ONNX, run with cuda-python streams.

Supported: JetPack 6.x (TensorRT 8.6 on 6.0, 10.3 on 6.1/6.2; CUDA 12 with
`cuda-python>=12,<13`; Python 3.10), i.e. TensorRT 8.6 and 10.x (`SUPPORTED_PLATFORMS`);
an older TensorRT is refused. JetPack 5.1 cannot run the node at all (Python 3.8).
Only APIs both 8.6 and 10 have are used: `build_serialized_network`,
`set_memory_pool_limit`, the named-tensor API (`num_io_tensors`, `get_tensor_name`,
`set_input_shape`, `set_tensor_address`, `execute_async_v3`; TensorRT >= 8.5),
`IInt8EntropyCalibrator2` and the DLA settings. The one difference is the network:
TensorRT 8.x needs the EXPLICIT_BATCH creation flag (its default, implicit batch, is
refused by the ONNX parser); TensorRT 10 has only explicit batch and deprecates the flag
(`network_flags`).

TensorRT and a CUDA GPU are needed (a Jetson or a dGPU host); neither can be
installed on the development machines, so this module is type-checked
against `tensorrt-stubs` and tested against fake `tensorrt` modules modelling the
8.6 and 10 APIs (tests/infer/test_tensorrt_api.py); the real-engine tests run only
where `tensorrt` imports.

Each of two slots owns an execution context, a CUDA stream, device buffers
and pinned host buffers sized for `max_batch`. `submit` copies a batch in,
enqueues H2D copy, `execute_async_v3` and D2H copy on its slot's stream and
returns at once; `collect` waits for that slot. `run_many` submits the next
batch before collecting the previous one, so copies of one overlap the
compute of the other (double buffering).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

# tensorrt-stubs 10.13.0.35.1 installs `tensorrt/__init__.pyi` without a py.typed marker and
# its `tensorrt_bindings/tensorrt.pyi` has syntax errors mypy cannot parse (e.g. line 5723), so
# mypy treats the module as untyped here; on CI with fixed stubs the ignore is unused.
import tensorrt as trt  # type: ignore[import-untyped, unused-ignore]

if not hasattr(trt, "Runtime"):  # the stubs alone leave an empty `tensorrt` namespace package
    raise ImportError("only its type stubs are installed", name="tensorrt")

from edge.durable import write_atomic
from edge.infer.backend import BackendError, Tensor
from edge.infer.manifest import ModelSpec, verify_io
from edge.infer.plans import (
    CUDA_PYTHON_REQUIREMENT,
    SUPPORTED_PLATFORMS,
    TENSORRT_MIN_VERSION,
    EngineKey,
    Environment,
    Progress,
    read_l4t,
    version_tuple,
)

__all__ = ["SUPPORTED_PLATFORMS", "TensorRTBackend", "TensorRTBuilder", "network_flags"]

log = structlog.get_logger(__name__)

_DTYPES: dict[Any, str] = {trt.DataType.FLOAT: "float32", trt.DataType.HALF: "float16",
                           trt.DataType.INT32: "int32", trt.DataType.INT8: "int8"}


def _cudart() -> Any:
    """cuda-python's runtime module; BackendError (one line) where cuda-python is missing."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:  # cuda-python < 12.6 layout
            from cuda import cudart
        except ImportError:
            raise BackendError(f"cuda-python is not installed here (the TensorRT backend needs "
                               f"the Python package {CUDA_PYTHON_REQUIREMENT!r}, in the `tensorrt` "
                               f"extra and in TensorRT release bundles)") from None
    return cudart


def _require_supported() -> None:
    """Refuse a TensorRT older than TENSORRT_MIN_VERSION (one line naming it)."""
    version = str(getattr(trt, "__version__", "unknown"))
    if version_tuple(version)[:2] < TENSORRT_MIN_VERSION:
        lowest = ".".join(map(str, TENSORRT_MIN_VERSION))
        raise BackendError(f"TensorRT {version} is too old: the node needs TensorRT >= {lowest} "
                           f"({SUPPORTED_PLATFORMS})")


def network_flags() -> int:
    """`Builder.create_network` flags for an explicit-batch network (the ONNX parser's only kind).

    TensorRT 8.x makes an implicit-batch network from 0, so it needs EXPLICIT_BATCH; in
    TensorRT 10 every network is explicit batch and EXPLICIT_BATCH is deprecated and ignored:
    0 there (also where a build lacks the flag)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    if flag is None or version_tuple(str(trt.__version__))[:1] >= (10,):
        return 0
    return 1 << int(flag)


def _check(result: Any) -> Any:
    """cuda-python returns (error, value...); raise on error, return the value(s)."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA error {err}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


@dataclass
class _Buffer:
    name: str
    is_input: bool
    item_shape: tuple[int, ...]
    host: np.ndarray  # pinned, (max_batch, *item_shape)
    host_ptr: int
    device_ptr: int
    nbytes_per_item: int


class _Slot:
    """One context + stream + buffers; a batch in flight at a time."""

    def __init__(self, engine: trt.ICudaEngine, names: Sequence[str], max_batch: int,
                 cudart: Any) -> None:
        self.cudart = cudart
        context = engine.create_execution_context()
        if context is None:
            raise BackendError("TensorRT could not create an execution context")
        self.context: trt.IExecutionContext = context
        self.stream = _check(cudart.cudaStreamCreate())
        self.buffers: list[_Buffer] = []
        self.pending = 0
        for name in names:
            shape = tuple(int(d) for d in engine.get_tensor_shape(name))[1:]
            count = max_batch * int(np.prod(shape))
            nbytes = count * 4
            host_ptr = int(_check(cudart.cudaMallocHost(nbytes)))
            arr = np.ctypeslib.as_array(ctypes.cast(host_ptr, ctypes.POINTER(ctypes.c_float)),
                                        shape=(max_batch, *shape))
            device_ptr = int(_check(cudart.cudaMalloc(nbytes)))
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            self.buffers.append(_Buffer(name, is_input, shape, arr, host_ptr, device_ptr,
                                        nbytes // max_batch))
            self.context.set_tensor_address(name, device_ptr)

    def submit(self, inputs: Mapping[str, Tensor], n: int) -> None:
        h2d = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for buf in self.buffers:
            if buf.is_input:
                buf.host[:n] = inputs[buf.name]
                self.context.set_input_shape(buf.name, (n, *buf.item_shape))
                _check(self.cudart.cudaMemcpyAsync(buf.device_ptr, buf.host_ptr,
                                                   n * buf.nbytes_per_item, h2d, self.stream))
        if not self.context.execute_async_v3(int(self.stream)):
            raise BackendError("TensorRT execute_async_v3 failed")
        for buf in self.buffers:
            if not buf.is_input:
                _check(self.cudart.cudaMemcpyAsync(buf.host_ptr, buf.device_ptr,
                                                   n * buf.nbytes_per_item, d2h, self.stream))
        self.pending = n

    def collect(self) -> dict[str, Tensor]:
        _check(self.cudart.cudaStreamSynchronize(self.stream))
        n, self.pending = self.pending, 0
        return {b.name: b.host[:n].copy() for b in self.buffers if not b.is_input}

    def close(self) -> None:
        for buf in self.buffers:
            self.cudart.cudaFree(buf.device_ptr)
            self.cudart.cudaFreeHost(buf.host_ptr)
        self.cudart.cudaStreamDestroy(self.stream)


class TensorRTBackend:
    """A TensorRT plan built from the manifest's ONNX (see `edge.infer.engines`)."""

    def __init__(self, spec: ModelSpec, plan: Path, *, max_batch: int = 8, slots: int = 2,
                 dla_core: int | None = None) -> None:
        _require_supported()
        self._spec = spec
        self._max_batch = max_batch
        self._cudart = _cudart()
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        if dla_core is not None:  # the core a DLA plan runs on is the runtime's
            runtime.DLA_core = dla_core
        engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise BackendError(f"{plan}: TensorRT cannot deserialize this plan (corrupt, or "
                               f"built by another TensorRT version or GPU)")
        self._engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        described = [(n, [int(d) for d in engine.get_tensor_shape(n)],
                      _DTYPES.get(engine.get_tensor_dtype(n), str(engine.get_tensor_dtype(n))))
                     for n in names]
        is_in = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        verify_io(spec, [d for d in described if is_in[d[0]]],
                  [d for d in described if not is_in[d[0]]])
        self._slots = [_Slot(engine, names, max_batch, self._cudart) for _ in range(slots)]
        self._next = 0
        log.info("model_loaded", model=spec.name, version=spec.version, backend="tensorrt",
                 plan=str(plan), max_batch=max_batch)

    @property
    def name(self) -> str:
        return "tensorrt"

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    def _chunks(self, inputs: Mapping[str, Tensor]) -> Iterator[dict[str, Tensor]]:
        n = len(next(iter(inputs.values())))
        for start in range(0, n, self._max_batch):
            yield {k: v[start:start + self._max_batch] for k, v in inputs.items()}

    def run_many(self, batches: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Run several batches, overlapping one batch's copies with the other's compute."""
        results: list[dict[str, Tensor]] = []
        in_flight: list[_Slot] = []
        for batch in batches:
            slot = self._slots[self._next]
            self._next = (self._next + 1) % len(self._slots)
            if slot.pending:
                results.append(slot.collect())
                in_flight.remove(slot)
            slot.submit(batch, len(next(iter(batch.values()))))
            in_flight.append(slot)
        results.extend(slot.collect() for slot in in_flight)
        return results

    def run(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        parts = self.run_many(list(self._chunks(inputs)))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def close(self) -> None:
        for slot in self._slots:
            slot.close()
        self._slots = []


class _Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc]  # base untyped: see import
    """Feeds a calibration set to TensorRT; reads/writes the calibration cache.

    TensorRT reads every input of a calibration batch in the shape of the calibration
    profile (`TensorRTBuilder.build` sets it to `batch_size` items), whatever `get_batch`
    copied: every batch must be exactly `batch_size` items. The set is re-cut into batches
    of the largest batch given, device buffers sized for that, and a short last batch is
    padded with items from the start of the set (real inputs: zeros or stale items from the
    previous batch would skew the activation histograms).
    """

    def __init__(self, batches: Sequence[Mapping[str, Tensor]], cache: Path, cudart: Any) -> None:
        super().__init__()
        if not batches:
            raise BackendError("INT8 needs a calibration set")
        names = list(batches[0])
        self._items = {n: np.ascontiguousarray(np.concatenate([b[n] for b in batches]),
                                               dtype=np.float32) for n in names}
        self._count = len(self._items[names[0]])
        self.batch_size = max(len(b[names[0]]) for b in batches)
        self._cache = cache
        self._cudart = cudart
        self._start = 0
        self._device: dict[str, int] = {}
        for name, items in self._items.items():
            self._device[name] = int(_check(cudart.cudaMalloc(self.batch_size * items[0].nbytes)))

    def get_batch_size(self) -> int:
        return self.batch_size

    def get_batch(self, names: list[str]) -> list[int] | None:
        if self._start >= self._count:
            return None
        take = [(self._start + i) % self._count for i in range(self.batch_size)]
        self._start += self.batch_size
        h2d = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        for name in names:
            arr = np.ascontiguousarray(self._items[name][take])
            _check(self._cudart.cudaMemcpy(self._device[name], arr.ctypes.data, arr.nbytes, h2d))
        return [self._device[n] for n in names]

    def read_calibration_cache(self) -> bytes | None:
        return self._cache.read_bytes() if self._cache.is_file() else None

    def write_calibration_cache(self, cache: Any) -> None:
        write_atomic(self._cache, bytes(cache))

    def close(self) -> None:
        for ptr in self._device.values():
            self._cudart.cudaFree(ptr)
        self._device = {}


class TensorRTBuilder:
    """Builds plans with the builder API TensorRT 8.6 and 10 share (used by `EngineCache`)."""

    def __init__(self) -> None:
        _require_supported()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._cudart = _cudart()

    def environment(self) -> Environment:
        props = _check(self._cudart.cudaGetDeviceProperties(0))
        return Environment(str(trt.__version__), f"{props.major}.{props.minor}", read_l4t())

    def build(self, onnx: Path, out: Path, key: EngineKey, *, progress: Progress,
              calibration: Sequence[Mapping[str, Tensor]] | None,
              calibration_cache: Path | None) -> None:
        builder = trt.Builder(self._logger)
        network = builder.create_network(network_flags())
        parser = trt.OnnxParser(network, self._logger)
        progress("parsing ONNX")
        if not parser.parse(onnx.read_bytes()):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise BackendError(f"{onnx}: TensorRT cannot parse it: {'; '.join(errors)}")
        inputs = [(t.name, tuple(int(d) for d in t.shape)[1:])
                  for t in (network.get_input(i) for i in range(network.num_inputs))]
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
        config.set_flag(trt.BuilderFlag.FP16)
        if key.dla_core is not None:
            cores = int(builder.num_DLA_cores)
            if not 0 <= key.dla_core < cores:
                raise BackendError(f"models.dla_core is {key.dla_core} but this device has "
                                   f"{cores} DLA core(s)")
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = key.dla_core
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        profile = builder.create_optimization_profile()
        lo, opt, hi = key.profile
        for name, item in inputs:
            profile.set_shape(name, (lo, *item), (opt, *item), (hi, *item))
        config.add_optimization_profile(profile)
        calibrator = None
        if key.precision == "int8":
            if not calibration or calibration_cache is None:
                raise BackendError("INT8 needs a calibration set")
            calibrator = _Calibrator(calibration, calibration_cache, self._cudart)
        try:
            if calibrator is not None:
                config.set_flag(trt.BuilderFlag.INT8)
                config.int8_calibrator = calibrator
                # TensorRT calibrates in the calibration profile's shapes: one full batch.
                n = calibrator.batch_size
                calib = builder.create_optimization_profile()
                for name, item in inputs:
                    calib.set_shape(name, (n, *item), (n, *item), (n, *item))
                config.set_calibration_profile(calib)
            progress(f"building {key.precision} engine (minutes on a Jetson)")
            serialized = builder.build_serialized_network(network, config)
        finally:
            if calibrator is not None:
                calibrator.close()  # its device buffers
        if serialized is None:
            raise BackendError(f"{onnx}: TensorRT engine build failed (see its log)")
        write_atomic(out, bytes(serialized))  # EngineCache renames it into place

    def loads(self, plan: Path) -> bool:
        runtime = trt.Runtime(self._logger)
        try:
            return runtime.deserialize_cuda_engine(plan.read_bytes()) is not None
        except Exception:  # a corrupt plan may raise instead of returning None
            return False
