"""TensorRT engine cache: build plans from the manifest's ONNX files once per environment.

A plan is only valid for the TensorRT version, GPU and JetPack/L4T release
that built it. Each plan has a JSON sidecar with its key (ONNX sha256,
TensorRT version, L4T, compute capability, precision, shape profile, DLA
core) and its own sha256; a plan whose key or hash does not match is
rebuilt, never loaded (and never rebuilt on every start). Builds go to a
temporary file that is renamed into place atomically; the previous good
plan is kept beside it (`*.prev.plan`) and stays in use when a build fails.
INT8 plans must match the FP16 plan on the golden/calibration inputs before
they are accepted.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import structlog

from edge.durable import fsync_dir, write_atomic
from edge.infer.backend import BackendError, Tensor
from edge.infer.manifest import ModelSpec, sha256_file
from edge.infer.plans import (
    DEFAULT_PROFILE,
    PRECISIONS,
    EngineBuilder,
    EngineKey,
    Progress,
)

log = structlog.get_logger(__name__)


def tensorrt_module() -> ModuleType:
    """`edge.infer.tensorrt`, or BackendError in one line naming what is missing: the
    `tensorrt` package or what it needs."""
    try:
        import edge.infer.tensorrt as module  # imports TensorRT itself
    except ImportError as exc:
        detail = " ".join(str(exc).split())  # one line
        if exc.name is not None and not exc.name.startswith("tensorrt"):
            raise BackendError(f"the TensorRT backend cannot be imported: {detail}") from None
        raise BackendError(f"TensorRT is not installed here (Python package `tensorrt`: "
                           f"{detail}); engines are built and run only on a machine with "
                           f"TensorRT and a CUDA GPU (JetPack 6)") from None
    return module


def tensorrt_builder() -> EngineBuilder:
    """The TensorRT builder, or BackendError in one line naming what is missing: the
    `tensorrt` package, `cuda-python`, or a TensorRT this node supports."""
    builder: EngineBuilder = tensorrt_module().TensorRTBuilder()  # BackendError: see there
    return builder


@dataclass(frozen=True, slots=True)
class PlanStatus:
    model: str
    precision: str
    plan: Path
    state: str  # fresh | missing | stale | corrupt
    detail: str
    key: dict[str, Any] | None


class EngineCache:
    """Plans under `root`: `<model>.<precision>.plan` + `.plan.json` sidecar."""

    def __init__(self, root: Path, builder: EngineBuilder | None = None, *,
                 profile: tuple[int, int, int] = DEFAULT_PROFILE, dla_core: int | None = None,
                 progress: Progress | None = None) -> None:
        self.root = root
        self._builder = builder
        self.profile = profile
        self.dla_core = dla_core
        self.progress = progress or (lambda msg: log.info("engine_build", step=msg))

    @property
    def builder(self) -> EngineBuilder:
        if self._builder is None:
            self._builder = tensorrt_builder()
        return self._builder

    def plan_path(self, model: str, precision: str) -> Path:
        return self.root / f"{model}.{precision}.plan"

    def key_for(self, spec: ModelSpec, precision: str) -> EngineKey:
        if precision not in PRECISIONS:
            raise BackendError(f"precision {precision!r}; expected one of {PRECISIONS}")
        env = self.builder.environment()
        return EngineKey(spec.sha256, env.tensorrt, env.l4t, env.compute_capability, precision,
                         self.profile, self.dla_core)

    def status(self, spec: ModelSpec, precision: str = "fp16") -> PlanStatus:
        plan = self.plan_path(spec.name, precision)
        sidecar = plan.with_name(plan.name + ".json")
        want = self.key_for(spec, precision)
        if not plan.is_file() or not sidecar.is_file():
            return PlanStatus(spec.name, precision, plan, "missing", "no plan yet", None)
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
            have = EngineKey.from_dict(meta["key"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return PlanStatus(spec.name, precision, plan, "corrupt", f"sidecar: {exc}", None)
        if have != want:
            changed = [k for k, v in want.to_dict().items() if have.to_dict().get(k) != v]
            return PlanStatus(spec.name, precision, plan, "stale",
                              "key changed: " + ", ".join(changed), have.to_dict())
        if sha256_file(plan) != meta.get("plan_sha256"):
            return PlanStatus(spec.name, precision, plan, "corrupt", "plan sha256 differs",
                              have.to_dict())
        return PlanStatus(spec.name, precision, plan, "fresh", meta.get("built_at", ""),
                          have.to_dict())

    def ensure(self, spec: ModelSpec, precision: str = "fp16", *,
               calibration: Sequence[Mapping[str, Tensor]] | None = None,
               accept: Callable[[Path], bool] | None = None) -> Path:
        """A fresh plan for `spec`, building it if missing, stale or corrupt.

        `accept` (INT8: the golden-set check against FP16) may reject a new
        plan; it is then kept as `*.rejected.plan` and `BackendError` raised.
        """
        st = self.status(spec, precision)
        if st.state == "fresh":
            return st.plan
        log.info("engine_rebuild", model=spec.name, precision=precision, state=st.state,
                 detail=st.detail)
        key = self.key_for(spec, precision)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = st.plan.with_name(f".{st.plan.name}.{os.getpid()}.tmp")
        calib_cache = self.root / f"{spec.name}.{spec.sha256[:12]}.int8.calib"
        started = time.monotonic()
        try:
            self.progress(f"{spec.name} {precision}: building from {spec.path.name}")
            self.builder.build(spec.path, tmp, key, progress=self.progress,
                               calibration=calibration if precision == "int8" else None,
                               calibration_cache=calib_cache if precision == "int8" else None)
            if not self.builder.loads(tmp):
                raise BackendError(f"{spec.name}: the new plan does not deserialize")
            if accept is not None and not accept(tmp):
                tmp.replace(st.plan.with_name(f"{spec.name}.{precision}.rejected.plan"))
                raise BackendError(f"{spec.name} {precision}: plan rejected by the golden-set "
                                   "check against FP16; not used")
            self._install(st.plan, tmp, key, time.monotonic() - started)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return st.plan

    def _install(self, plan: Path, tmp: Path, key: EngineKey, seconds: float) -> None:
        """Rename the built plan into place and write its sidecar.

        The plan is renamed, not copied (hundreds of MB): the builder wrote `tmp` durably
        (TensorRTBuilder through edge.durable) and the folder is fsynced after the renames.
        Any crash between the steps leaves a plan whose sha256 the sidecar does not name:
        `status` calls it stale or corrupt and it is rebuilt, never loaded."""
        sidecar = plan.with_name(plan.name + ".json")
        meta = {"key": key.to_dict(), "key_digest": key.digest(),
                "plan_sha256": sha256_file(tmp), "build_seconds": round(seconds, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if plan.is_file():
            os.replace(plan, plan.with_name(plan.name.replace(".plan", ".prev.plan")))
        os.replace(tmp, plan)
        fsync_dir(plan.parent)  # the plan is in place before a sidecar names it
        write_atomic(sidecar, json.dumps(meta, indent=2))
        self.progress(f"{plan.name}: built in {seconds:.1f} s")

    def plan_for(self, spec: ModelSpec, precision: str = "fp16") -> Path:
        """The plan the node loads: FP16 (built if needed) or an accepted, fresh INT8 plan.

        INT8 plans are only built by `edge-node engines build --precision int8`
        (calibration + golden check); without a fresh one the node uses FP16.
        """
        if precision == "int8":
            st = self.status(spec, "int8")
            if st.state == "fresh":
                return st.plan
            log.warning("int8_plan_unavailable", model=spec.name, state=st.state,
                        detail=st.detail, using="fp16")
        return self.ensure(spec, "fp16")

    def verify(self, spec: ModelSpec, precision: str = "fp16") -> PlanStatus:
        """Status plus a deserialization check of a fresh plan."""
        st = self.status(spec, precision)
        if st.state == "fresh" and not self.builder.loads(st.plan):
            return PlanStatus(st.model, precision, st.plan, "corrupt", "does not deserialize",
                              st.key)
        return st
