# ruff: noqa: N802, N815  (the names of the APIs they stand in for)
"""Fake `tensorrt` and cuda-python runtime modules modelling the TensorRT 8.6 and 10 APIs.

What differs between the two, as far as the node uses them:

* 8.6: `Builder.create_network(0)` makes an *implicit-batch* network, which the ONNX
  parser refuses; `1 << int(NetworkDefinitionCreationFlag.EXPLICIT_BATCH)` makes an
  explicit-batch one.
* 10: every network is explicit batch; EXPLICIT_BATCH is deprecated and ignored (10.3,
  as on JetPack 6.1/6.2) or gone (`explicit_batch_flag=False`).

Everything else the builder, backend and calibrator call exists in both (TensorRT >= 8.5).
"Device" memory is real host memory; every copy is bounds-checked against its allocation,
so a buffer sized too small is an AssertionError, not silent corruption. The fake
"model" has one input `x` (batch, 3) and one output `y` (batch, 2) = 2 * x[:, :2].
"""

from __future__ import annotations

import ctypes
import enum
import json
import types
from typing import Any

import numpy as np


class FakeCudart:
    """The slice of `cuda.bindings.runtime` the backend uses: (error, value) tuples."""

    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def __init__(self) -> None:
        self.device: dict[int, Any] = {}  # ptr -> ctypes buffer (kept alive)
        self.host: dict[int, Any] = {}

    def _alloc(self, table: dict[int, Any], nbytes: int) -> tuple[int, int]:
        buf = ctypes.create_string_buffer(max(1, nbytes))
        ptr = ctypes.addressof(buf)
        table[ptr] = buf
        return 0, ptr

    def cudaMalloc(self, nbytes: int) -> tuple[int, int]:
        return self._alloc(self.device, nbytes)

    def cudaMallocHost(self, nbytes: int) -> tuple[int, int]:
        return self._alloc(self.host, nbytes)

    def cudaFree(self, ptr: int) -> tuple[int]:
        del self.device[ptr]
        return (0,)

    def cudaFreeHost(self, ptr: int) -> tuple[int]:
        del self.host[ptr]
        return (0,)

    def check_device(self, ptr: int, nbytes: int) -> None:
        """AssertionError unless [ptr, ptr + nbytes) lies inside one device allocation."""
        for start, buf in self.device.items():
            if start <= ptr < start + ctypes.sizeof(buf):
                assert ptr + nbytes <= start + ctypes.sizeof(buf), (
                    f"{nbytes} bytes at device offset {ptr - start} overflow an allocation of "
                    f"{ctypes.sizeof(buf)} bytes")
                return
        raise AssertionError(f"{ptr:#x} is not device memory")

    def read(self, ptr: int, nbytes: int) -> bytes:
        self.check_device(ptr, nbytes)
        return ctypes.string_at(ptr, nbytes)

    def cudaMemcpy(self, dst: int, src: int, nbytes: int, kind: int) -> tuple[int]:
        self.check_device(dst if kind == 1 else src, nbytes)
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: int,
                        stream: int) -> tuple[int]:
        return self.cudaMemcpy(dst, src, nbytes, kind)

    def cudaStreamCreate(self) -> tuple[int, int]:
        return 0, 7

    def cudaStreamSynchronize(self, stream: int) -> tuple[int]:
        return (0,)

    def cudaStreamDestroy(self, stream: int) -> tuple[int]:
        return (0,)

    def cudaGetDeviceProperties(self, device: int) -> tuple[int, Any]:
        return 0, types.SimpleNamespace(major=8, minor=7)


def make_fake_tensorrt(version: str, cudart: FakeCudart, *,
                       explicit_batch_flag: bool | None = None,
                       dla_cores: int = 2) -> types.ModuleType:
    """A `tensorrt` module of `version` (8.x or 10.x API). `explicit_batch_flag`: whether
    NetworkDefinitionCreationFlag.EXPLICIT_BATCH exists (default: on 8.x and 10.x, as the
    real 10.3 still has it, deprecated)."""
    major = int(version.split(".", 1)[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]
    has_flag = True if explicit_batch_flag is None else explicit_batch_flag
    if major >= 10:
        members = {"STRONGLY_TYPED": 1, **({"EXPLICIT_BATCH": 0} if has_flag else {})}
    else:
        members = {"EXPLICIT_BATCH": 0, "EXPLICIT_PRECISION": 1}
    flag_enum = enum.IntEnum("NetworkDefinitionCreationFlag", members)  # type: ignore[misc]

    data_type = enum.Enum("DataType", "FLOAT HALF INT8 INT32")
    io_mode = enum.Enum("TensorIOMode", "NONE INPUT OUTPUT")
    builder_flag = enum.Enum("BuilderFlag", "FP16 INT8 DEBUG GPU_FALLBACK")
    device_type = enum.Enum("DeviceType", "GPU DLA")
    pool_type = enum.Enum("MemoryPoolType", "WORKSPACE DLA_MANAGED_SRAM")
    builders: list[Builder] = []
    runtimes: list[Runtime] = []

    class Logger:
        WARNING = 2

        def __init__(self, severity: int = 2) -> None:
            self.severity = severity

    class ITensor:
        def __init__(self, name: str, shape: tuple[int, ...]) -> None:
            self.name = name
            self.shape = shape

    class INetworkDefinition:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.explicit_batch = major >= 10 or bool(
                flags & (1 << int(flag_enum["EXPLICIT_BATCH"])))
            self.inputs: list[ITensor] = []

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, i: int) -> ITensor:
            return self.inputs[i]

    class OnnxParser:
        def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
            self.network = network
            self.errors: list[str] = []

        def parse(self, model: bytes) -> bool:
            if not self.network.explicit_batch:
                self.errors.append("This version of the ONNX parser only supports TensorRT "
                                   "INetworkDefinitions with an explicit batch dimension")
                return False
            self.network.inputs = [ITensor("x", (-1, 3))]
            return True

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> str:
            return self.errors[i]

    class IOptimizationProfile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

        def set_shape(self, name: str, lo: tuple[int, ...], opt: tuple[int, ...],
                      hi: tuple[int, ...]) -> None:
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)), (lo, opt, hi)
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class IBuilderConfig:
        def __init__(self) -> None:
            self.flags: set[Any] = set()
            self.pools: dict[Any, int] = {}
            self.profiles: list[IOptimizationProfile] = []
            self.calibration_profile: IOptimizationProfile | None = None
            self.int8_calibrator: Any = None
            self.default_device_type = device_type.GPU
            self.DLA_core = -1

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            self.pools[pool] = size

        def set_flag(self, flag: Any) -> None:
            self.flags.add(flag)

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def set_calibration_profile(self, profile: IOptimizationProfile) -> bool:
            self.calibration_profile = profile
            return True

    class Builder:
        def __init__(self, logger: Logger) -> None:
            self.num_DLA_cores = dla_cores
            self.network: INetworkDefinition | None = None
            self.config: IBuilderConfig | None = None
            self.calibration_reads: dict[str, list[np.ndarray]] = {}
            builders.append(self)

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            self.network = INetworkDefinition(flags)
            return self.network

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network: INetworkDefinition,
                                     config: IBuilderConfig) -> bytes | None:
            assert network.explicit_batch
            self.config = config
            if builder_flag.INT8 in config.flags:
                self._calibrate(network, config)
            dla = config.DLA_core if config.default_device_type == device_type.DLA else None
            return b"PLAN" + json.dumps({"dla_core": dla}).encode()

        def _calibrate(self, network: INetworkDefinition, config: IBuilderConfig) -> None:
            """What TensorRT does: read the calibration profile's kOPT shape per input from
            the pointers get_batch returns, until it returns None."""
            calibrator = config.int8_calibrator
            assert calibrator is not None
            if calibrator.read_calibration_cache():
                return
            profile = config.calibration_profile or config.profiles[0]
            names = [t.name for t in network.inputs]
            reads: dict[str, list[np.ndarray]] = {n: [] for n in names}
            while True:
                ptrs = calibrator.get_batch(names)
                if not ptrs:
                    break
                for name, ptr in zip(names, ptrs, strict=True):
                    shape = profile.shapes[name][1]
                    raw = cudart.read(ptr, int(np.prod(shape)) * 4)
                    reads[name].append(np.frombuffer(raw, np.float32).reshape(shape).copy())
            self.calibration_reads = reads
            calibrator.write_calibration_cache(b"calibration table")

    class IExecutionContext:
        def __init__(self) -> None:
            self.addresses: dict[str, int] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addresses[name] = ptr
            return True

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            self.shapes[name] = tuple(shape)
            return True

        def execute_async_v3(self, stream: int) -> bool:
            n = self.shapes["x"][0]
            x = np.frombuffer(cudart.read(self.addresses["x"], n * 3 * 4), np.float32)
            y = np.ascontiguousarray(2 * x.reshape(n, 3)[:, :2])
            cudart.check_device(self.addresses["y"], y.nbytes)
            ctypes.memmove(self.addresses["y"], y.ctypes.data, y.nbytes)
            return True

    class ICudaEngine:
        _io = (("x", (-1, 3), io_mode.INPUT), ("y", (-1, 2), io_mode.OUTPUT))

        def __init__(self, meta: dict[str, Any]) -> None:
            self.meta = meta

        @property
        def num_io_tensors(self) -> int:
            return len(self._io)

        def get_tensor_name(self, i: int) -> str:
            return self._io[i][0]

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return next(s for n, s, _ in self._io if n == name)

        def get_tensor_dtype(self, name: str) -> Any:
            return data_type.FLOAT

        def get_tensor_mode(self, name: str) -> Any:
            return next(m for n, _, m in self._io if n == name)

        def create_execution_context(self) -> IExecutionContext:
            return IExecutionContext()

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            self.DLA_core = -1
            runtimes.append(self)

        def deserialize_cuda_engine(self, data: bytes) -> ICudaEngine | None:
            if not data.startswith(b"PLAN"):
                return None
            return ICudaEngine(json.loads(data[4:]))

    class IInt8EntropyCalibrator2:
        def __init__(self) -> None:
            self.base_initialised = True

    for name, value in {
        "Logger": Logger, "Builder": Builder, "Runtime": Runtime, "OnnxParser": OnnxParser,
        "NetworkDefinitionCreationFlag": flag_enum, "DataType": data_type,
        "TensorIOMode": io_mode, "BuilderFlag": builder_flag, "DeviceType": device_type,
        "MemoryPoolType": pool_type, "IInt8EntropyCalibrator2": IInt8EntropyCalibrator2,
        "ICudaEngine": ICudaEngine, "IExecutionContext": IExecutionContext,
        "builders": builders, "runtimes": runtimes,
    }.items():
        setattr(trt, name, value)
    return trt
