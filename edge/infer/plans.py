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
