"""The node's configuration: typed, validated, loaded from YAML.

Every section is a frozen dataclass; `load_config` turns a YAML mapping into
them and raises `ConfigError` (key path, bad value, what was expected) for
anything it cannot accept: unknown keys, wrong types, out-of-range values,
files that do not exist. Defaults run the demo: synthetic cameras, ONNX
Runtime on the CPU, a broker on loopback. The sections of the node's links
beyond its line (`mqtt`, `opcua`, `sparkplug`, `site`) live in
`edge.config_sections` and are imported from here.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml

from edge.config_schema import ConfigError, build_section, config_to_mapping, setting
from edge.config_sections import (
    MqttConfig,
    OpcUaConfig,
    SiteConfig,
    SparkplugConfig,
    TlsConfig,
    is_loopback,
)

# Re-exported: callers know these as parts of the node's configuration.
__all__ = ["ConfigError", "MqttConfig", "OpcUaConfig", "SiteConfig", "SparkplugConfig",
           "TlsConfig", "config_to_mapping", "is_loopback"]

#: The largest batch the TensorRT engines' optimisation profile accepts (`edge.infer.engines`).
TENSORRT_MAX_BATCH = 16
#: Where the models and their manifest live in a source checkout.
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MANIFEST = REPO_ROOT / "engines" / "manifest.yaml"


@dataclass(frozen=True, slots=True)
class NodeConfig:
    node_id: str = setting("edge-01", doc="unique ID of this node; part of every topic and verdict")
    line_id: str = setting("line-1", doc="conveyor line this node watches")
    heap_trim_interval_s: float | None = setting(
        10.0, lo=0.1, doc="hand freed heap memory back to the OS this often (glibc keeps "
        "it for the life of the process otherwise); null: never")


@dataclass(frozen=True, slots=True)
class DepthFilters:
    decimation: int = setting(1, lo=1, hi=8, doc="decimation magnitude (1 = off)")
    spatial: bool = setting(False, doc="edge-preserving spatial filter")
    temporal: bool = setting(False, doc="temporal filter; smears moving items, off on a belt")
    hole_filling: bool = setting(False, doc="fill invalid pixels from neighbours")


@dataclass(frozen=True, slots=True)
class CameraConfig:
    id: str = setting(doc="name of this view, e.g. 'top'")
    source: Literal["synthetic", "realsense", "recording"] = setting(
        "synthetic", doc="frame source")
    serial: str | None = setting(None, doc="RealSense serial number (source: realsense)")
    recording: Path | None = setting(None, doc=".db3/.bag file (source: recording)",
                                path_must_exist=True)
    width: int = setting(640, lo=64, hi=4096, doc="colour width in pixels")
    height: int = setting(480, lo=48, hi=4096, doc="colour height in pixels")
    fps: int = setting(30, lo=1, hi=300, doc="frames per second")
    calibration: Path | None = setting(None, doc="calibration YAML written by edge-calibrate",
                                  path_must_exist=True)
    sync_mode: Literal["default", "master", "slave"] = setting(
        "default", doc="RealSense inter_cam_sync_mode for hardware-synced rigs")
    filters: DepthFilters = setting(factory=DepthFilters, doc="depth post-processing")
    required: bool = setting(
        True, doc="the node goes READY only once this camera streams, and reports itself "
        "degraded while it does not; false: a view the line may run without")
    realtime: bool = setting(True, doc="recordings/synthetic: pace frames in real time; false: as "
                        "fast as the node takes them, recordings kept abreast of each other")


def _default_cameras() -> tuple[CameraConfig, ...]:
    return (CameraConfig(id="top"), CameraConfig(id="angled"))


@dataclass(frozen=True, slots=True)
class SyntheticConfig:
    seed: int = setting(0, lo=0, doc="world seed; same seed, same frames")
    items_per_second: float = setting(2.0, lo=0.0, hi=20.0, doc="mean induct rate")
    damage_rate: float = setting(0.001, lo=0.0, hi=1.0, doc="fraction of damaged items")
    confounder_rate: float = setting(0.05, lo=0.0, hi=1.0,
                                doc="fraction of items with damage-like prints")
    touching_rate: float = setting(0.02, lo=0.0, hi=1.0, doc="fraction of items inducted touching")
    severity_mix: tuple[float, ...] = setting(
        (0.0, 0.0, 1.0),
        doc="relative shares of subtle, moderate and severe damage (edge.sim.world)")
    nuisance: float = setting(
        0.0, lo=0.0, hi=1.0, doc="strength of lighting changes, cast shadows, belt dirt, motion "
        "blur and depth dropout patches: 0 none, 1 as in the training datasets")
    nuisance_period_ms: float = setting(
        1000.0, lo=0.0, hi=3_600_000.0,
        doc="how long one draw of lighting, shadows and blur lasts per camera; 0: every frame")
    depth_noise_scale: float = setting(1.0, lo=0.0, hi=10.0,
                                       doc="stereo depth noise relative to a D4xx's")
    start_ms: float | None = setting(None, lo=0.0, doc="world start on the wall clock (ms since "
                                "epoch); default: when the node starts")


@dataclass(frozen=True, slots=True)
class BeltConfig:
    speed_mps: float = setting(1.2, lo=0.01, hi=10.0, doc="belt speed in m/s")
    width_mm: float = setting(600.0, lo=100.0, hi=3000.0, doc="belt width")
    induct_to_camera_m: float = setting(2.0, lo=0.0, hi=100.0,
                                   doc="distance from the induct point to the camera centre")
    camera_to_divert_m: float = setting(3.0, lo=0.1, hi=100.0,
                                   doc="distance from the camera centre to the divert point")
    safety_margin_ms: float = setting(400.0, lo=0.0, hi=60000.0,
                                 doc="publish the fail-safe verdict this long before the divert")


@dataclass(frozen=True, slots=True)
class ItemsConfig:
    min_height_mm: float = setting(
        12.0, lo=1.0, hi=500.0, doc="height above the belt that is an item")
    min_area_mm2: float = setting(1500.0, lo=0.0, doc="smaller blobs are noise")
    association_tolerance_ms: float = setting(400.0, lo=1.0, hi=60000.0,
                                         doc="induct-to-arrival timing tolerance")
    crop_size: int = setting(128, lo=32, hi=1024, doc="side of the square model crop")
    max_item_length_mm: float = setting(360.0, lo=50.0, hi=5000.0,
                                   doc="longer footprints are touching items (split or merged)")
    lost_after_ms: float = setting(250.0, lo=10.0, hi=10000.0,
                              doc="a track unseen this long has left the view: emit its record")
    min_observations: int = setting(2, lo=1, hi=100, doc="sightings before a track becomes an item")
    emit_past_centre_mm: float | None = setting(
        60.0, lo=0.0, hi=5000.0, doc="emit an item's record as soon as no camera can see it more "
        "centrally, at the latest once its centre is this far past the cameras' centre; null: "
        "only when it leaves the view")
    workers: int = setting(
        2, lo=0, hi=64, doc="processes that find items in the frames, in parallel "
                      "(segmentation holds the GIL); 0: in the item stage's own thread")


@dataclass(frozen=True, slots=True)
class SyncConfig:
    tolerance_ms: float | None = setting(None, lo=0.0, doc="max skew inside a frameset; "
                                    "default half a frame period")
    camera_timeout_ms: float = setting(500.0, lo=1.0, doc="go on without a camera after this")


@dataclass(frozen=True, slots=True)
class ShadowConfig:
    # Not checked for existence: a missing or broken candidate is logged and left out, and
    # never stops production from starting.
    manifest: Path | None = setting(
        None, doc="candidate models scored beside the production ones on every judged item, "
        "off the critical path (they never decide); null: no shadow scoring")
    max_queue: int = setting(
        64, lo=1, hi=10_000, doc="judged items waiting for the candidate; more are skipped "
        "and counted")
    max_snapshots_per_minute: int = setting(
        30, lo=0, hi=6000, doc="disagreements kept as audit snapshots, at most, per minute "
        "(more are counted, not kept); they also yield to production's snapshots")


@dataclass(frozen=True, slots=True)
class ModelsConfig:
    manifest: Path = setting(DEFAULT_MANIFEST, doc="engines/manifest.yaml", path_must_exist=True)
    backend: Literal["onnxruntime", "tensorrt"] = setting("onnxruntime", doc="inference backend")
    intra_op_threads: int = setting(1, lo=1, hi=64, doc="ONNX Runtime intra-op threads")
    max_batch: int = setting(8, lo=1, hi=64, doc="items per inference call")
    engine_cache: Path = setting(Path("/var/cache/conveyor-vision/engines"),
                            doc="TensorRT plans are built here")
    gallery_dir: Path = setting(Path("/var/lib/conveyor-vision/gallery"),
                           doc="reference gallery (learns at run time)")
    gallery_learn_per_hour: int = setting(
        20, lo=0, hi=10_000, doc="views of one product the gallery may learn from "
        "packaging_changed feedback in an hour; more are held for review")
    onnx_providers: tuple[str, ...] = setting(
        factory=tuple, doc="ONNX Runtime providers to try before the CPU, e.g. "
        "[CUDAExecutionProvider]; ones not installed are skipped")
    tensorrt_precision: Literal["fp16", "int8"] = setting(
        "fp16", doc="plan precision; int8 only once `engines build --precision int8` passed "
        "its golden check, else fp16 is used")
    dla_core: int | None = setting(
        None, lo=0, hi=1, doc="backend tensorrt: build and run the plans on this DLA core "
        "(Jetson Orin AGX/NX), GPU fallback for unsupported layers; null: the GPU")
    shadow: ShadowConfig = setting(factory=ShadowConfig, doc="a candidate model set scored "
                                   "in shadow (docs/models.md#shadow-scoring)")


@dataclass(frozen=True, slots=True)
class DecisionConfig:
    fail_safe: Literal["sideline", "pass"] = setting("sideline",
                                                 doc="decision when no verdict is ready in time")
    unannounced: Literal["sideline", "pass"] = setting("sideline",
                                                   doc="decision for items nobody announced")
    merged: Literal["sideline", "pass"] = setting(
        "sideline", doc="decision for blobs of touching items that could not be told apart")
    views_missing: Literal["judge", "sideline"] = setting(
        "judge", doc="judge on the views that saw the item, or sideline when one is missing")
    out_of_distribution: Literal["sideline", "pass", "judge"] = setting(
        "sideline", doc="decision for items the models cannot judge (not like the parcels they "
        "know: reason out_of_distribution); judge: decide on the scores anyway")
    finding_min_probability: float = setting(0.5, lo=0.0, hi=1.0,
                                        doc="per-type probability reported as a finding")


@dataclass(frozen=True, slots=True)
class StorageConfig:
    state_dir: Path = setting(Path("/var/lib/conveyor-vision"), doc="outbox, gallery, snapshots")
    outbox_max_rows: int = setting(
        100_000, lo=100, doc="verdict outbox bound: acknowledged rows are "
                              "pruned first, then unacknowledged ones past their deadline")
    snapshots_max_mb: float = setting(2048.0, lo=1.0, doc="ring store size cap")
    snapshots_max_age_h: float = setting(168.0, lo=0.01, doc="ring store age cap")
    snapshot_pass_sample: float = setting(0.001, lo=0.0, hi=1.0, doc="share of passed items kept")
    snapshots: bool = setting(True, doc="keep audit snapshots of sidelined (and sampled) items")
    snapshots_min_free_mb: float = setting(1024.0, lo=0.0, doc="free disk space the ring store "
                                      "always leaves; oldest snapshots go first")


@dataclass(frozen=True, slots=True)
class ShadowGateConfig:
    enabled: bool = setting(False, doc="refuse an update that changes the models unless "
                            "this device ran exactly those models in shadow (models.shadow) "
                            "within the bounds below")
    min_items: int = setting(1000, lo=1, doc="items the candidate must have scored in shadow")
    min_agreement: float = setting(0.98, lo=0.0, hi=1.0, doc="share of those items on which "
                                   "it must have decided as production did")
    max_sideline_rate_increase: float = setting(
        0.01, lo=0.0, hi=1.0, doc="how far its sideline rate in shadow may lie above "
        "production's (0.01: one percentage point)")
    max_sideline_rate_decrease: float = setting(
        0.01, lo=0.0, hi=1.0, doc="how far its sideline rate in shadow may lie below "
        "production's (0.01: one percentage point): a candidate that passes what production "
        "sidelines is no better for agreeing on the rest")
    max_failed_share: float = setting(
        0.01, lo=0.0, hi=1.0, doc="share of the items it tried to score (scored and failed) "
        "on which the candidate may have failed")


@dataclass(frozen=True, slots=True)
class UpdateConfig:
    shadow_gate: ShadowGateConfig = setting(factory=ShadowGateConfig, doc="the shadow record "
                                            "a models update needs (edge/update/shadow_gate.py)")


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = setting("info", doc="log level")
    format: Literal["auto", "json", "console"] = setting(
        "auto", doc="auto: console on a terminal, JSON lines otherwise")


@dataclass(frozen=True, slots=True)
class HttpTlsConfig:
    cert_file: Path | None = setting(None, doc="server certificate (PEM, any chain after it)",
                                path_must_exist=True)
    key_file: Path | None = setting(None, doc="its private key (PEM, unencrypted)",
                               path_must_exist=True)


@dataclass(frozen=True, slots=True)
class HttpConfig:
    port: int = setting(0, lo=0, hi=65535, doc="metrics and live page port (0 = off)")
    bind: str = setting("127.0.0.1", doc="address to bind")
    live_page: bool = setting(False, doc="serve the live page besides /metrics")
    token_file: Path | None = setting(
        None, doc="token required when bound beyond localhost, sent as 'Authorization: Bearer "
        "<token>'", path_must_exist=True)
    tls: HttpTlsConfig = setting(factory=HttpTlsConfig, doc="serve HTTPS with this certificate "
                            "and key; required when bound beyond loopback")
    allow_plaintext: bool = setting(
        False, doc="bound beyond loopback, serve plain HTTP without http.tls (the token and "
        "pages cross the network in clear text); false: refused")
    live_recent: int = setting(12, lo=1, hi=200, doc="sidelined items shown on the live page")


@dataclass(frozen=True, slots=True)
class Config:
    node: NodeConfig = setting(factory=NodeConfig, doc="identity")
    cameras: tuple[CameraConfig, ...] = setting(factory=_default_cameras, doc="camera views")
    synthetic: SyntheticConfig = setting(factory=SyntheticConfig, doc="synthetic conveyor")
    belt: BeltConfig = setting(factory=BeltConfig, doc="belt geometry")
    sync: SyncConfig = setting(factory=SyncConfig, doc="multi-camera sync")
    items: ItemsConfig = setting(factory=ItemsConfig, doc="item finding")
    models: ModelsConfig = setting(factory=ModelsConfig, doc="models and backend")
    decision: DecisionConfig = setting(factory=DecisionConfig, doc="verdict policy")
    mqtt: MqttConfig = setting(factory=MqttConfig, doc="broker connection")
    storage: StorageConfig = setting(factory=StorageConfig, doc="local state")
    logging: LoggingConfig = setting(factory=LoggingConfig, doc="logs")
    http: HttpConfig = setting(factory=HttpConfig, doc="metrics and live page")
    opcua: OpcUaConfig = setting(factory=OpcUaConfig, doc="OPC UA for PLCs (off unless enabled)")
    sparkplug: SparkplugConfig = setting(factory=SparkplugConfig,
                                         doc="Sparkplug B for SCADA (off unless enabled)")
    site: SiteConfig = setting(factory=SiteConfig, doc="what the nodes of one site share "
                               "through the broker (off unless site.share_gallery)")
    update: UpdateConfig = setting(factory=UpdateConfig, doc="what `edge-node update apply` "
                                   "asks of a release beyond its signature and health")


def check_http_token(http: HttpConfig) -> None:
    """ConfigError when the HTTP endpoint is bound beyond loopback without a token file."""
    if http.token_file is None and not is_loopback(http.bind):
        raise ConfigError("http.token_file", None,
                          f"a token file: http.bind {http.bind!r} is not a loopback address")


def check_http_tls(http: HttpConfig) -> None:
    """ConfigError for half a TLS setting, or for plain HTTP bound beyond loopback without
    `http.allow_plaintext`."""
    tls = http.tls
    if (tls.cert_file is None) != (tls.key_file is None):
        missing, given = (("key_file", "cert_file") if tls.key_file is None
                          else ("cert_file", "key_file"))
        raise ConfigError(f"http.tls.{missing}", None, f"a file, set with http.tls.{given}")
    if tls.cert_file is None and not http.allow_plaintext and not is_loopback(http.bind):
        raise ConfigError(
            "http.tls.cert_file", None,
            f"a certificate and key (http.tls.cert_file, http.tls.key_file) to serve HTTPS, as "
            f"http.bind {http.bind!r} is not a loopback address and plain HTTP would send the "
            "token across the network in clear text (http.allow_plaintext: true accepts that)")


# scheme://user[:password]@ at the start of a URL
_URL_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")


def _shown_url(url: str) -> str:
    """`url` fit for an error message: a 'user:password@' in it becomes '***@'."""
    return _URL_USERINFO.sub(r"\1***@", url)


def check_mqtt_credentials(mqtt: MqttConfig, source: str) -> None:
    """ConfigError when credentials (from `source`) would go to the broker over plain
    mqtt:// without `mqtt.allow_plaintext_credentials`.

    A broker on loopback is exempt: the password never leaves this machine, and whoever can
    read its loopback traffic can read the credential file as well.
    """
    for key, url in _keyed_urls(mqtt):
        if mqtt.allow_plaintext_credentials or not url.startswith("mqtt://"):
            continue
        try:
            host = urlsplit(url).hostname
        except ValueError:  # a malformed URL: not this check's to report
            host = None
        if host and is_loopback(host):
            continue
        raise ConfigError(
            key, _shown_url(url),
            f"an mqtts:// URL, as MQTT credentials are set ({source}) and over mqtt:// the "
            "password would cross the network in clear text (mqtt.allow_plaintext_credentials: "
            "true accepts that; a loopback broker needs neither)")


def _keyed_urls(mqtt: MqttConfig) -> list[tuple[str, str]]:
    """(config key, URL) of every broker: `mqtt.url`, or `mqtt.url[i]` for a list."""
    if isinstance(mqtt.url, str):
        return [("mqtt.url", mqtt.url)]
    return [(f"mqtt.url[{i}]", u) for i, u in enumerate(mqtt.url)]


def _check_mqtt(mqtt: MqttConfig) -> None:
    """What the config alone shows of the broker connection (credentials from the
    environment or systemd are checked by `edge.publish.connection.load_credentials`)."""
    if not mqtt.urls:
        raise ConfigError("mqtt.url", [], "a broker URL, or a list of at least one")
    for key, url in _keyed_urls(mqtt):
        if not url.startswith(("mqtt://", "mqtts://")):
            raise ConfigError(key, _shown_url(url), "a URL like mqtt://127.0.0.1:1883")
        if _URL_USERINFO.match(url):
            raise ConfigError(key, _shown_url(url),
                              "a URL without a username or password: they belong in "
                              "mqtt.credentials_file, $CV_MQTT_USERNAME/$CV_MQTT_PASSWORD or "
                              "the systemd credential 'mqtt'")
    if len({u.split("://")[0] for u in mqtt.urls}) > 1:
        raise ConfigError("mqtt.url", list(mqtt.urls), "URLs of one scheme: all mqtts:// or "
                          "all mqtt:// (one TLS setting serves them all)")
    if mqtt.urls[0].startswith("mqtt://"):
        for f in dataclasses.fields(mqtt.tls):
            value = getattr(mqtt.tls, f.name)
            if value is not None:
                raise ConfigError(f"mqtt.tls.{f.name}", str(value),
                                  "no TLS setting with a plain mqtt:// URL, where it would be "
                                  "ignored and the connection left unencrypted (use mqtts://)")
    if mqtt.credentials_file is not None:
        check_mqtt_credentials(mqtt, "mqtt.credentials_file")


_CAMERA_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _check_dla(models: ModelsConfig) -> None:
    """A DLA core only means something to TensorRT plans; ONNX Runtime would ignore it."""
    if models.dla_core is not None and models.backend != "tensorrt":
        raise ConfigError("models.dla_core", models.dla_core,
                          "null unless models.backend is tensorrt (DLA runs TensorRT plans)")


def _check_sparkplug(sp: SparkplugConfig) -> None:
    """Its IDs are topic levels; a broker of its own obeys the rules of mqtt:."""
    for key, value in (("group_id", sp.group_id), ("edge_node_id", sp.edge_node_id)):
        if value is not None and any(ch in value for ch in "/#+"):
            raise ConfigError(f"sparkplug.{key}", value, "no '/', '#' or '+'")
    try:
        _check_mqtt(sp.broker or MqttConfig())
    except ConfigError as exc:
        raise ConfigError("sparkplug.broker" + exc.path.removeprefix("mqtt"), exc.value,
                          exc.expected) from None


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
    _check_mqtt(cfg.mqtt)
    if "#" in cfg.mqtt.topic_prefix or "+" in cfg.mqtt.topic_prefix:
        raise ConfigError("mqtt.topic_prefix", cfg.mqtt.topic_prefix, "no MQTT wildcards")
    for key in ("node_id", "line_id"):
        value = getattr(cfg.node, key)
        if any(ch in value for ch in "/#+ "):
            raise ConfigError(f"node.{key}", value, "no '/', '#', '+' or spaces")
    if cfg.models.backend == "tensorrt" and cfg.models.max_batch > TENSORRT_MAX_BATCH:
        # every larger batch would fail on the device
        raise ConfigError("models.max_batch", cfg.models.max_batch,
                          f"at most {TENSORRT_MAX_BATCH} with backend tensorrt (the "
                          "engines' optimisation profile)")
    _check_dla(cfg.models)
    _check_sparkplug(cfg.sparkplug)
    # Found at load time, not once the models and cameras are up (a restart loop).
    if cfg.http.port:
        check_http_token(cfg.http)
        check_http_tls(cfg.http)


def config_from_mapping(data: object) -> Config:
    """Build and validate a `Config` from already-parsed YAML."""
    cfg = build_section(Config, data, "")
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


