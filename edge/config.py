"""The node's configuration: typed, validated, loaded from YAML.

Every section is a frozen dataclass; `load_config` turns a YAML mapping into
them and raises `ConfigError` (key path, bad value, what was expected) for
anything it cannot accept: unknown keys, wrong types, out-of-range values,
files that do not exist. Defaults run the demo: synthetic cameras, ONNX
Runtime on the CPU, a broker on loopback.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

#: Where the models and their manifest live in a source checkout.
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MANIFEST = REPO_ROOT / "engines" / "manifest.yaml"


class ConfigError(ValueError):
    """A configuration value that cannot be used, with the key path that holds it."""

    def __init__(self, path: str, value: object, expected: str) -> None:
        self.path = path or "<root>"
        self.value = value
        self.expected = expected
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"config key '{self.path}': got {shown}, expected {expected}")


def _f(default: Any = dataclasses.MISSING, *, lo: float | None = None, hi: float | None = None,
       doc: str = "", path_must_exist: bool = False, factory: Any = dataclasses.MISSING) -> Any:
    meta = {"min": lo, "max": hi, "doc": doc, "exists": path_must_exist}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    node_id: str = _f("edge-01", doc="unique ID of this node; part of every topic and verdict")
    line_id: str = _f("line-1", doc="conveyor line this node watches")
    heap_trim_interval_s: float | None = _f(
        10.0, lo=0.1, doc="hand freed heap memory back to the OS this often (glibc keeps "
        "it for the life of the process otherwise); null: never")


@dataclass(frozen=True, slots=True)
class DepthFilters:
    decimation: int = _f(1, lo=1, hi=8, doc="decimation magnitude (1 = off)")
    spatial: bool = _f(False, doc="edge-preserving spatial filter")
    temporal: bool = _f(False, doc="temporal filter; smears moving items, off on a belt")
    hole_filling: bool = _f(False, doc="fill invalid pixels from neighbours")


@dataclass(frozen=True, slots=True)
class CameraConfig:
    id: str = _f(doc="name of this view, e.g. 'top'")
    source: Literal["synthetic", "realsense", "recording"] = _f("synthetic", doc="frame source")
    serial: str | None = _f(None, doc="RealSense serial number (source: realsense)")
    recording: Path | None = _f(None, doc=".db3/.bag file (source: recording)",
                                path_must_exist=True)
    width: int = _f(640, lo=64, hi=4096, doc="colour width in pixels")
    height: int = _f(480, lo=48, hi=4096, doc="colour height in pixels")
    fps: int = _f(30, lo=1, hi=300, doc="frames per second")
    calibration: Path | None = _f(None, doc="calibration YAML written by edge-calibrate",
                                  path_must_exist=True)
    sync_mode: Literal["default", "master", "slave"] = _f(
        "default", doc="RealSense inter_cam_sync_mode for hardware-synced rigs")
    filters: DepthFilters = _f(factory=DepthFilters, doc="depth post-processing")
    realtime: bool = _f(True, doc="recordings/synthetic: pace frames in real time; false: as "
                        "fast as the node takes them, recordings kept abreast of each other")


def _default_cameras() -> tuple[CameraConfig, ...]:
    return (CameraConfig(id="top"), CameraConfig(id="angled"))


@dataclass(frozen=True, slots=True)
class SyntheticConfig:
    seed: int = _f(0, lo=0, doc="world seed; same seed, same frames")
    items_per_second: float = _f(2.0, lo=0.0, hi=20.0, doc="mean induct rate")
    damage_rate: float = _f(0.001, lo=0.0, hi=1.0, doc="fraction of damaged items")
    confounder_rate: float = _f(0.05, lo=0.0, hi=1.0,
                                doc="fraction of items with damage-like prints")
    touching_rate: float = _f(0.02, lo=0.0, hi=1.0, doc="fraction of items inducted touching")
    start_ms: float | None = _f(None, lo=0.0, doc="world start on the wall clock (ms since "
                                "epoch); default: when the node starts")


@dataclass(frozen=True, slots=True)
class BeltConfig:
    speed_mps: float = _f(1.2, lo=0.01, hi=10.0, doc="belt speed in m/s")
    width_mm: float = _f(600.0, lo=100.0, hi=3000.0, doc="belt width")
    induct_to_camera_m: float = _f(2.0, lo=0.0, hi=100.0,
                                   doc="distance from the induct point to the camera centre")
    camera_to_divert_m: float = _f(3.0, lo=0.1, hi=100.0,
                                   doc="distance from the camera centre to the divert point")
    safety_margin_ms: float = _f(400.0, lo=0.0, hi=60000.0,
                                 doc="publish the fail-safe verdict this long before the divert")


@dataclass(frozen=True, slots=True)
class ItemsConfig:
    min_height_mm: float = _f(12.0, lo=1.0, hi=500.0, doc="height above the belt that is an item")
    min_area_mm2: float = _f(1500.0, lo=0.0, doc="smaller blobs are noise")
    association_tolerance_ms: float = _f(400.0, lo=1.0, hi=60000.0,
                                         doc="induct-to-arrival timing tolerance")
    crop_size: int = _f(128, lo=32, hi=1024, doc="side of the square model crop")
    max_item_length_mm: float = _f(360.0, lo=50.0, hi=5000.0,
                                   doc="longer footprints are touching items (split or merged)")
    lost_after_ms: float = _f(250.0, lo=10.0, hi=10000.0,
                              doc="a track unseen this long has left the view: emit its record")
    min_observations: int = _f(2, lo=1, hi=100, doc="sightings before a track becomes an item")
    emit_past_centre_mm: float | None = _f(
        60.0, lo=0.0, hi=5000.0, doc="emit an item's record as soon as no camera can see it more "
        "centrally, at the latest once its centre is this far past the cameras' centre; null: "
        "only when it leaves the view")
    workers: int = _f(2, lo=0, hi=64, doc="processes that find items in the frames, in parallel "
                      "(segmentation holds the GIL); 0: in the item stage's own thread")


@dataclass(frozen=True, slots=True)
class SyncConfig:
    tolerance_ms: float | None = _f(None, lo=0.0, doc="max skew inside a frameset; "
                                    "default half a frame period")
    camera_timeout_ms: float = _f(500.0, lo=1.0, doc="go on without a camera after this")


@dataclass(frozen=True, slots=True)
class ModelsConfig:
    manifest: Path = _f(DEFAULT_MANIFEST, doc="engines/manifest.yaml", path_must_exist=True)
    backend: Literal["onnxruntime", "tensorrt"] = _f("onnxruntime", doc="inference backend")
    intra_op_threads: int = _f(1, lo=1, hi=64, doc="ONNX Runtime intra-op threads")
    max_batch: int = _f(8, lo=1, hi=64, doc="items per inference call")
    engine_cache: Path = _f(Path("/var/cache/conveyor-vision/engines"),
                            doc="TensorRT plans are built here")
    gallery_dir: Path = _f(Path("/var/lib/conveyor-vision/gallery"),
                           doc="reference gallery (learns at run time)")
    onnx_providers: tuple[str, ...] = _f(
        factory=tuple, doc="ONNX Runtime providers to try before the CPU, e.g. "
        "[CUDAExecutionProvider]; ones not installed are skipped")
    tensorrt_precision: Literal["fp16", "int8"] = _f(
        "fp16", doc="plan precision; int8 only once `engines build --precision int8` passed "
        "its golden check, else fp16 is used")


@dataclass(frozen=True, slots=True)
class DecisionConfig:
    fail_safe: Literal["sideline", "pass"] = _f("sideline",
                                                 doc="decision when no verdict is ready in time")
    unannounced: Literal["sideline", "pass"] = _f("sideline",
                                                   doc="decision for items nobody announced")
    merged: Literal["sideline", "pass"] = _f(
        "sideline", doc="decision for blobs of touching items that could not be told apart")
    views_missing: Literal["judge", "sideline"] = _f(
        "judge", doc="judge on the views that saw the item, or sideline when one is missing")
    finding_min_probability: float = _f(0.5, lo=0.0, hi=1.0,
                                        doc="per-type probability reported as a finding")


@dataclass(frozen=True, slots=True)
class TlsConfig:
    ca_file: Path | None = _f(None, doc="CA bundle that signed the broker", path_must_exist=True)
    cert_file: Path | None = _f(None, doc="client certificate", path_must_exist=True)
    key_file: Path | None = _f(None, doc="client key", path_must_exist=True)


@dataclass(frozen=True, slots=True)
class MqttConfig:
    url: str = _f("mqtt://127.0.0.1:1883", doc="broker URL: mqtt://HOST:PORT or mqtts://")
    topic_prefix: str = _f("conveyor-vision", doc="root of the topic tree")
    client_id: str | None = _f(None, doc="default: cv-<node_id>")
    credentials_file: Path | None = _f(
        None, doc="file with 'username:password'; or $CV_MQTT_USERNAME/$CV_MQTT_PASSWORD, or "
        "the systemd credential 'mqtt'", path_must_exist=True)
    tls: TlsConfig = _f(factory=TlsConfig, doc="TLS settings (mqtts://)")
    keepalive_s: int = _f(10, lo=1, hi=3600, doc="MQTT keepalive")
    protocol: Literal["auto", "5", "3.1.1"] = _f("auto", doc="MQTT protocol version")
    status_interval_s: float = _f(30.0, lo=0.1, hi=3600.0,
                                  doc="re-publish the retained status with fresh health this often")


@dataclass(frozen=True, slots=True)
class StorageConfig:
    state_dir: Path = _f(Path("/var/lib/conveyor-vision"), doc="outbox, gallery, snapshots")
    outbox_max_rows: int = _f(100_000, lo=100, doc="verdict outbox bound: acknowledged rows are "
                              "pruned first, then unacknowledged ones past their deadline")
    snapshots_max_mb: float = _f(2048.0, lo=1.0, doc="ring store size cap")
    snapshots_max_age_h: float = _f(168.0, lo=0.01, doc="ring store age cap")
    snapshot_pass_sample: float = _f(0.001, lo=0.0, hi=1.0, doc="share of passed items kept")
    snapshots: bool = _f(True, doc="keep audit snapshots of sidelined (and sampled) items")
    snapshots_min_free_mb: float = _f(1024.0, lo=0.0, doc="free disk space the ring store "
                                      "always leaves; oldest snapshots go first")


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = _f("info", doc="log level")
    format: Literal["auto", "json", "console"] = _f(
        "auto", doc="auto: console on a terminal, JSON lines otherwise")


@dataclass(frozen=True, slots=True)
class HttpConfig:
    port: int = _f(0, lo=0, hi=65535, doc="metrics and live page port (0 = off)")
    bind: str = _f("127.0.0.1", doc="address to bind")
    live_page: bool = _f(False, doc="serve the live page besides /metrics")
    token_file: Path | None = _f(None, doc="token required when bound beyond localhost",
                                 path_must_exist=True)
    live_recent: int = _f(12, lo=1, hi=200, doc="sidelined items shown on the live page")


@dataclass(frozen=True, slots=True)
class Config:
    node: NodeConfig = _f(factory=NodeConfig, doc="identity")
    cameras: tuple[CameraConfig, ...] = _f(factory=_default_cameras, doc="camera views")
    synthetic: SyntheticConfig = _f(factory=SyntheticConfig, doc="synthetic conveyor")
    belt: BeltConfig = _f(factory=BeltConfig, doc="belt geometry")
    sync: SyncConfig = _f(factory=SyncConfig, doc="multi-camera sync")
    items: ItemsConfig = _f(factory=ItemsConfig, doc="item finding")
    models: ModelsConfig = _f(factory=ModelsConfig, doc="models and backend")
    decision: DecisionConfig = _f(factory=DecisionConfig, doc="verdict policy")
    mqtt: MqttConfig = _f(factory=MqttConfig, doc="broker connection")
    storage: StorageConfig = _f(factory=StorageConfig, doc="local state")
    logging: LoggingConfig = _f(factory=LoggingConfig, doc="logs")
    http: HttpConfig = _f(factory=HttpConfig, doc="metrics and live page")


T = TypeVar("T")


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is type(None):
        return "null"
    if tp is Path:
        return "a file path"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _convert(tp: Any, value: object, path: str, meta: dict[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path, meta)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(path, value, _describe(tp))
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool):
            # YAML reads 5 as int; accept its string form for string literals.
            if str(value) in allowed and not isinstance(value, bool):
                return str(value)
            raise ConfigError(path, value, _describe(tp))
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(path, value, _describe(tp))
        (item_tp, _) = typing.get_args(tp)
        return tuple(_convert(item_tp, v, f"{path}[{i}]", {}) for i, v in enumerate(value))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, value, "true or false")
        return value
    if tp in (int, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if tp is int and ok and not float(value).is_integer():  # type: ignore[arg-type]
            ok = False
        if not ok or math.isnan(float(value)):  # type: ignore[arg-type]  # NaN slips past ranges
            raise ConfigError(path, value, _describe(tp))
        number = tp(value)
        lo, hi = meta.get("min"), meta.get("max")
        if (lo is not None and number < lo) or (hi is not None and number > hi) or (
            number in (float("inf"), float("-inf"))
        ):
            bounds = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            raise ConfigError(path, value, f"{_describe(tp)} {bounds}")
        return number
    if tp is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(path, value, "a non-empty string")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(path, value, "a file path")
        p = Path(value).expanduser()
        if meta.get("exists") and not p.exists():
            raise ConfigError(path, value, "an existing file (it does not exist)")
        return p
    raise ConfigError(path, value, _describe(tp))  # pragma: no cover - config schema bug


def _build(cls: type[T], data: object, path: str) -> T:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, data, "a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"{path}.{key}" if path else str(key), data[key],
                              f"no such key here; allowed keys: {allowed}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key_path = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key_path, dict(f.metadata))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(key_path, None, f"a value ({f.metadata.get('doc', 'required')})")
    return cls(**kwargs)


def is_loopback(bind: str) -> bool:
    """Whether an HTTP bind address is reachable from this machine only."""
    if bind == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return False


def check_http_token(http: HttpConfig) -> None:
    """ConfigError when the HTTP endpoint is bound beyond loopback without a token file."""
    if http.token_file is None and not is_loopback(http.bind):
        raise ConfigError("http.token_file", None,
                          f"a token file: http.bind {http.bind!r} is not a loopback address")


_CAMERA_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _check_cross_fields(cfg: Config) -> None:
    ids = [c.id for c in cfg.cameras]
    if not ids:
        raise ConfigError("cameras", [], "at least one camera")
    for i, cam in enumerate(cfg.cameras):
        # IDs name snapshot files and URL paths: a '/' or a space there broke both.
        if not _CAMERA_ID.fullmatch(cam.id):
            raise ConfigError(f"cameras[{i}].id", cam.id,
                              "1-64 letters, digits, '.', '_' or '-'")
        if ids.index(cam.id) != i:
            raise ConfigError(f"cameras[{i}].id", cam.id, "a camera ID used only once")
        if cam.source == "realsense" and not cam.serial:
            raise ConfigError(f"cameras[{i}].serial", None, "a serial number for a RealSense")
        if cam.source == "recording" and cam.recording is None:
            raise ConfigError(f"cameras[{i}].recording", None, "a .db3 or .bag file")
    if not cfg.mqtt.url.startswith(("mqtt://", "mqtts://")):
        raise ConfigError("mqtt.url", cfg.mqtt.url, "a URL like mqtt://127.0.0.1:1883")
    if "#" in cfg.mqtt.topic_prefix or "+" in cfg.mqtt.topic_prefix:
        raise ConfigError("mqtt.topic_prefix", cfg.mqtt.topic_prefix, "no MQTT wildcards")
    for key in ("node_id", "line_id"):
        value = getattr(cfg.node, key)
        if any(ch in value for ch in "/#+ "):
            raise ConfigError(f"node.{key}", value, "no '/', '#', '+' or spaces")
    if cfg.models.backend == "tensorrt":
        from edge.infer.engines import DEFAULT_PROFILE

        if cfg.models.max_batch > DEFAULT_PROFILE[2]:  # every larger batch would fail
            raise ConfigError("models.max_batch", cfg.models.max_batch,
                              f"at most {DEFAULT_PROFILE[2]} with backend tensorrt (the "
                              "engines' optimisation profile)")
    # Found at load time, not once the models and cameras are up (a restart loop).
    if cfg.http.port:
        check_http_token(cfg.http)


def config_from_mapping(data: object) -> Config:
    """Build and validate a `Config` from already-parsed YAML."""
    cfg = _build(Config, data, "")
    _check_cross_fields(cfg)
    return cfg


def load_config(path: Path | str | None) -> Config:
    """Load a YAML file (None: the embedded defaults)."""
    if path is None:
        return config_from_mapping({})
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("<file>", str(p), "an existing config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("<file>", str(p), f"a readable UTF-8 file ({exc})") from None
    return parse_config_text(text)


def parse_config_text(text: str) -> Config:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("<file>", text[:40], f"valid YAML{where}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ConfigError("<file>", text[:40], f"valid YAML ({exc})") from None
    return config_from_mapping(data)


def config_to_mapping(cfg: object) -> Any:
    """The inverse of `config_from_mapping`, for `--print-config` and tests."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_mapping(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [config_to_mapping(v) for v in cfg]
    if isinstance(cfg, Path):
        return str(cfg)
    if isinstance(cfg, enum.Enum):
        return cfg.value
    return cfg
