"""`edge-node check`: what is wrong with this node's setup, and how to fix it."""

from __future__ import annotations

import importlib.util
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from edge.capture.calibration import load_camera_calibration
from edge.catalogue import load_catalogue
from edge.config import Config, ConfigError
from edge.infer.golden import golden_self_test
from edge.infer.inspector import ItemInspector
from edge.publish.connection import BrokerConfigError, parse_url


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    ok: bool
    detail: str
    fix: str = ""


def _calibrations(cfg: Config) -> list[Finding]:
    out = []
    for cam in cfg.cameras:
        if cam.source == "synthetic":
            out.append(Finding(f"calibration {cam.id}", True, "synthetic camera: pose is known"))
            continue
        if cam.calibration is None:
            out.append(Finding(f"calibration {cam.id}", False, "no calibration file configured",
                               f"run `edge-calibrate belt` for camera {cam.serial or cam.id} "
                               "and set cameras[].calibration"))
            continue
        try:
            cal = load_camera_calibration(cam.calibration, serial=cam.serial,
                                          resolution=(cam.width // cam.filters.decimation,
                                                      cam.height // cam.filters.decimation))
        except ConfigError as exc:
            out.append(Finding(f"calibration {cam.id}", False, str(exc),
                               "re-run edge-calibrate for this camera and resolution"))
            continue
        ok = cal.pose is not None
        out.append(Finding(f"calibration {cam.id}", ok,
                           f"{cam.calibration} ({cal.calibrated_at})" if ok else
                           "calibration has no belt pose", "" if ok else "run edge-calibrate belt"))
    return out


def _models(cfg: Config) -> list[Finding]:
    try:
        # Read only: a node may be running on this gallery (with other models, even).
        inspector = ItemInspector.load(cfg.models, load_catalogue(), read_only=True)
    except Exception as exc:  # every way a model can be broken is reported, not raised
        return [Finding("models", False, str(exc),
                        "reinstall the release's engines/ folder or fix models.manifest")]

    versions = ", ".join(f"{k} {v}" for k, v in inspector.model_versions().items())
    try:  # what the node runs before READY: a release that fails it never starts
        report = golden_self_test(inspector)
    except Exception as exc:
        return [Finding("models", False, f"golden self-test could not run: {exc}",
                        "reinstall the release's engines/ folder or fix models.manifest")]
    finally:
        inspector.close()
    if not report.passed:
        return [Finding("models", False, f"{versions}: golden self-test failed: "
                        + "; ".join(report.failures[:3]),
                        "these models do not reproduce their expected scores on this device: "
                        "reinstall the release or rebuild its engines")]
    out = [Finding("models", True, f"{cfg.models.manifest}: {versions} (golden self-test passed)")]
    if cfg.models.backend == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        out.append(Finding("tensorrt", False, "backend is tensorrt but TensorRT is not "
                           "installed", "install JetPack's TensorRT or use onnxruntime"))
    return out


def _cameras(cfg: Config) -> list[Finding]:
    out = []
    serials: set[str] | None = None
    for cam in cfg.cameras:
        if cam.source == "synthetic":
            out.append(Finding(f"camera {cam.id}", True, "synthetic"))
        elif cam.source == "recording":
            ok = cam.recording is not None and cam.recording.is_file()
            out.append(Finding(f"camera {cam.id}", ok, f"recording {cam.recording}",
                               "" if ok else "point cameras[].recording at a .db3 file"))
        else:
            if serials is None:
                serials = _connected_serials()
            ok = cam.serial in serials
            seen = "connected" if ok else f"not found (seen: {sorted(serials)})"
            out.append(Finding(f"camera {cam.id}", ok, f"RealSense {cam.serial} {seen}",
                               "" if ok else "check the USB3 cable and `rs-enumerate-devices`"))
    return out


def _connected_serials() -> set[str]:
    try:
        import pyrealsense2 as rs  # optional: only nodes with RealSense cameras have it
    except ImportError:
        return set()
    return {d.get_info(rs.camera_info.serial_number) for d in rs.context().query_devices()}


def _broker(cfg: Config, timeout_s: float) -> list[Finding]:
    """Every configured broker (a failover list: each of them) accepts connections."""
    out = []
    for url in cfg.mqtt.urls:
        try:  # the node's own reading of the URL: what it refuses, the check refuses
            address = parse_url(url)
        except BrokerConfigError as exc:
            out.append(Finding("broker", False, str(exc), "fix mqtt.url"))
            continue
        host, port = address.host, address.port
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                pass
        except OSError as exc:
            out.append(Finding("broker", False, f"{host}:{port}: {exc}",
                               "start the broker or fix mqtt.url; check firewall and TLS port"))
            continue
        out.append(Finding("broker", True, f"{host}:{port} accepts connections"))
    return out


def run_checks(cfg: Config, *, broker_timeout_s: float = 5.0, out: TextIO = sys.stdout) -> int:
    """Print every finding; exit code 0 only when all pass."""
    findings: list[Finding] = [Finding("config", True, "valid")]
    checks: list[Callable[[], list[Finding]]] = [
        lambda: _calibrations(cfg), lambda: _models(cfg), lambda: _cameras(cfg),
        lambda: _broker(cfg, broker_timeout_s)]
    for check in checks:
        findings.extend(check())
    for f in findings:
        mark = "ok  " if f.ok else "FAIL"
        print(f"[{mark}] {f.check}: {f.detail}", file=out)
        if not f.ok and f.fix:
            print(f"       fix: {f.fix}", file=out)
    failed = [f for f in findings if not f.ok]
    print(f"{len(findings) - len(failed)} ok, {len(failed)} failed", file=out)
    return 1 if failed else 0
