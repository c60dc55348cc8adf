"""Config: defaults that run the demo, and one clear error for anything wrong."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.config import (
    Config,
    ConfigError,
    config_from_mapping,
    config_to_mapping,
    load_config,
    parse_config_text,
)


def test_defaults_run_the_demo() -> None:
    """With no file the node gets two synthetic cameras, ONNX Runtime and a loopback broker."""
    cfg = load_config(None)
    assert [c.source for c in cfg.cameras] == ["synthetic", "synthetic"]
    assert cfg.models.backend == "onnxruntime"
    assert cfg.mqtt.url.startswith("mqtt://127.0.0.1")


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    """A config written back to YAML loads into the same config."""
    cfg = load_config(None)
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(config_to_mapping(cfg)))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("belt: {speed_mps: -1}", "belt.speed_mps", "between"),
        ("belt: {speed_mps: fast}", "belt.speed_mps", "a number"),
        ("cameras: [{id: top, colour: red}]", "cameras[0].colour", "allowed keys"),
        ("cameras: [{id: a}, {id: a}]", "cameras[1].id", "only once"),
        ("cameras: [{id: a, source: realsense}]", "cameras[0].serial", "serial"),
        ("cameras: [{source: synthetic}]", "cameras[0].id", "a value"),
        ("models: {backend: openvino}", "models.backend", "'onnxruntime', 'tensorrt'"),
        ("mqtt: {url: 'http://x'}", "mqtt.url", "mqtt://"),
        ("mqtt: {credentials_file: /nonexistent/creds}", "mqtt.credentials_file", "does not exist"),
        ("node: {node_id: 'a/b'}", "node.node_id", "no '/'"),
        ("items: {crop_size: 12.5}", "items.crop_size", "an integer"),
        ("logging: {level: loud}", "logging.level", "one of"),
        ("belt: [1, 2]", "belt", "a mapping"),
        ("[unclosed", "<file>", "valid YAML at line"),
    ],
)
def test_bad_values_name_key_value_and_expectation(text: str, key: str, words: str) -> None:
    """Each bad value gets one error that names its key path and what was expected."""
    with pytest.raises(ConfigError) as err:
        parse_config_text(text)
    assert err.value.path == key
    assert words in str(err.value)
    assert key in str(err.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A config path that does not exist is reported, not a traceback."""
    with pytest.raises(ConfigError, match="existing config file"):
        load_config(tmp_path / "nope.yaml")


def test_cli_reports_config_errors_without_traceback(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`edge-node synth record --config BAD` prints the error and exits 2."""
    from edge.commands.main import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("belt: {speed_mps: 0}\n")
    code = main(["synth", "record", "--out", str(tmp_path / "x.db3"), "--seconds", "1",
                 "--config", str(bad)])
    err = capsys.readouterr().err
    assert code == 2
    assert "belt.speed_mps" in err
    assert "Traceback" not in err


_yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                          st.floats(allow_nan=True), st.text(max_size=12))
_keys = st.sampled_from(["node", "cameras", "belt", "mqtt", "models", "speed_mps", "id", "url",
                         "fps", "width", "x", "synthetic", "seed", "logging", "level"])
_yaml_values = st.recursive(_yaml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(_keys, inner, max_size=4)), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(doc=st.one_of(st.dictionaries(_keys, _yaml_values, max_size=5), _yaml_values))
def test_random_yaml_gives_config_or_config_error(doc: object) -> None:
    """Any YAML document yields a Config or a ConfigError: never another exception."""
    text = yaml.safe_dump(doc)
    try:
        cfg = parse_config_text(text)
    except ConfigError as exc:
        error: ConfigError | None = exc
    else:
        error = None
        assert isinstance(cfg, Config)
    assert error is None or error.path


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=200))
def test_random_bytes_give_config_or_config_error(raw: bytes) -> None:
    """Arbitrary text never escapes as anything but a ConfigError."""
    with contextlib.suppress(ConfigError):
        parse_config_text(raw.decode("utf-8", errors="replace"))


@pytest.mark.parametrize("camera_id", ["a/b", "cam 1", "", "kamera-ü"])
def test_camera_ids_that_cannot_name_files_and_urls_are_refused(camera_id: str) -> None:
    """Camera IDs name snapshot files and URL paths: with a '/' every snapshot write failed."""
    with pytest.raises(ConfigError, match=r"cameras\[0\]\.id"):
        config_from_mapping({"cameras": [{"id": camera_id}]})


def test_a_tensorrt_batch_beyond_the_engines_profile_is_refused() -> None:
    """Engines are built for batches up to 16: a larger models.max_batch would fail every
    larger batch on the device, found only there."""
    with pytest.raises(ConfigError, match=r"models\.max_batch.*at most 16"):
        config_from_mapping({"models": {"backend": "tensorrt", "max_batch": 32}})
    assert config_from_mapping({"models": {"backend": "tensorrt", "max_batch": 16}})
    assert config_from_mapping({"models": {"backend": "onnxruntime", "max_batch": 32}})


@pytest.mark.parametrize("url", ["mqtt://broker.site.example:1883", "mqtt://10.0.0.5"])
def test_a_credentials_file_over_plain_mqtt_to_a_remote_broker_is_refused(
        tmp_path: Path, url: str) -> None:
    """A credentials file with a plain mqtt:// broker beyond loopback stops the node at load:
    the password would cross the network in clear text."""
    creds = tmp_path / "creds"
    creds.write_text("user:hunter2-XYZZY\n")
    with pytest.raises(ConfigError) as err:
        config_from_mapping({"mqtt": {"url": url, "credentials_file": str(creds)}})
    assert err.value.path == "mqtt.url"
    assert "clear text" in str(err.value)
    assert "mqtt.allow_plaintext_credentials" in str(err.value)
    assert "XYZZY" not in str(err.value)
    opted_in = config_from_mapping({"mqtt": {"url": url, "credentials_file": str(creds),
                                             "allow_plaintext_credentials": True}})
    assert opted_in.mqtt.allow_plaintext_credentials
    secure = url.replace("mqtt://", "mqtts://")
    assert config_from_mapping({"mqtt": {"url": secure, "credentials_file": str(creds)}})


@pytest.mark.parametrize("url", ["mqtt://127.0.0.1:1883", "mqtt://127.0.0.53", "mqtt://[::1]:1883",
                                 "mqtt://localhost"])
def test_a_credentials_file_over_plain_mqtt_to_a_loopback_broker_is_accepted(
        tmp_path: Path, url: str) -> None:
    """A broker on this machine may take credentials over mqtt://: they never leave it."""
    creds = tmp_path / "creds"
    creds.write_text("user:pw\n")
    cfg = config_from_mapping({"mqtt": {"url": url, "credentials_file": str(creds)}})
    assert cfg.mqtt.url == url


def test_credentials_in_the_broker_url_are_refused_without_showing_the_password() -> None:
    """A username and password in mqtt.url are refused at load; the error masks them."""
    for url in ("mqtt://edge:hunter2-XYZZY@broker.site.example:1883",
                "mqtts://edge:hunter2-XYZZY@broker.site.example", "mqtt://edge@127.0.0.1"):
        with pytest.raises(ConfigError) as err:
            config_from_mapping({"mqtt": {"url": url}})
        assert err.value.path == "mqtt.url"
        assert "mqtt.credentials_file" in str(err.value)
        assert "XYZZY" not in str(err.value)
        assert "***@" in str(err.value)
