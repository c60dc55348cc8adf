"""What a TensorRT plan is built for: the build environment, the cache key, the builder's
interface. Shared by the engine cache (`engines`) and the TensorRT backend (`tensorrt`)
without either importing the other.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from edge.config import TENSORRT_MAX_BATCH
from edge.infer.backend import Tensor

Progress = Callable[[str], None]

PRECISIONS = ("fp16", "int8")

DEFAULT_PROFILE = (1, 8, TENSORRT_MAX_BATCH)  # min, opt, max batch

#: What the TensorRT backend supports, at the least. JetPack 5.1 (TensorRT 8.5/8.6) ships
#: Python 3.8, older than the node's `requires-python` (>= 3.10): it cannot run the node.
SUPPORTED_PLATFORMS = ("JetPack 6.x: TensorRT 8.6 on 6.0, 10.3 on 6.1/6.2; CUDA 12; Python 3.10 "
                       "(JetPack 5.1 cannot run the node: Python 3.8)")
#: The oldest TensorRT the builder and backend accept (JetPack 6.0's).
TENSORRT_MIN_VERSION = (8, 6)
#: cuda-python for the CUDA major of JetPack 6; the `tensorrt` extra and TensorRT release
#: bundles (tools/make_bundle.py --backend tensorrt) carry it.
CUDA_PYTHON_REQUIREMENT = "cuda-python>=12,<13"


def version_tuple(version: str) -> tuple[int, ...]:
    """(major, minor, ...) of a version string like '10.3.0.30' (digits up to the first other
    character per part)."""
    parts = []
    for part in version.split("."):
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


@dataclass(frozen=True, slots=True)
class EngineKey:
    onnx_sha256: str
    tensorrt: str
    l4t: str | None
    compute_capability: str
    precision: str
    profile: tuple[int, int, int]
    dla_core: int | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["profile"] = list(self.profile)
        return d

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> EngineKey:
        p = d["profile"]
        return EngineKey(str(d["onnx_sha256"]), str(d["tensorrt"]), d.get("l4t"),
                         str(d["compute_capability"]), str(d["precision"]),
                         (int(p[0]), int(p[1]), int(p[2])), d.get("dla_core"))

    def digest(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

@dataclass(frozen=True, slots=True)
class Environment:
    tensorrt: str
    compute_capability: str
    l4t: str | None

class EngineBuilder(Protocol):
    """What the cache needs from TensorRT (a fake in tests where TensorRT is absent)."""

    def environment(self) -> Environment: ...

    def build(self, onnx: Path, out: Path, key: EngineKey, *, progress: Progress,
              calibration: Sequence[Mapping[str, Tensor]] | None,
              calibration_cache: Path | None) -> None: ...

    def loads(self, plan: Path) -> bool: ...

def read_l4t(path: Path = Path("/etc/nv_tegra_release")) -> str | None:
    """The JetPack/L4T release line of a Jetson (None elsewhere)."""
    try:
        first = path.read_text(encoding="utf-8").splitlines()[0]
    except (OSError, IndexError):
        return None
    return " ".join(first.split()[:5]).strip("# ,") or None
