"""The inference backend protocol: one opened model, named float32 tensors in and out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np
import numpy.typing as npt

from edge.infer.manifest import ModelSpec

Tensor = npt.NDArray[np.float32]


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
