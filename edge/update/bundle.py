"""Release bundles: a signed manifest plus payload files, in one tar archive.

A bundle (`*.cvb`, a tar, optionally gzip-compressed) holds:

- `manifest.json`: `{"format": 1, "version", "kind": "full"|"models", "base_version",
  "created_ms", "files": [{"path", "sha256", "size", "mode"}]}`;
- `manifest.sig`: base64 of the ed25519 signature over the exact bytes of manifest.json;
- `payload/<path>` for every file the manifest lists, and nothing else.

A *full* release carries `wheels/` (the node and its dependencies, installed into a fresh
venv on the device), `engines/` (ONNX models and `manifest.yaml`) and `config/`. A
*models* release carries only `engines/` files and reuses the running release's venv.

`extract_verified` checks the signature before it trusts a single byte of the manifest,
then streams every payload file into a staging directory while hashing it; a wrong size
or hash, a missing, extra or duplicate file, a link or device, or a truncated archive
raises `BundleError` and leaves the staging directory for the caller to remove.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from packaging.version import InvalidVersion, Version

from edge.infer.manifest import sha256_file

FORMAT = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
PAYLOAD_DIR = "payload"
_VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._+-]{0,63}$")
_MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_CHUNK = 1 << 20

Kind = Literal["full", "models"]
ReleaseOrder = tuple[Version, tuple[tuple[int, int, str], ...]]


class BundleError(ValueError):
    """A bundle that must not be installed; the message says why."""


@dataclass(frozen=True, slots=True)
class Verified:
    """A bundle whose signature and payload checked out."""

    manifest: BundleManifest
    manifest_raw: bytes  # the exact signed bytes, kept as the release's release.json
    signature: bytes


@dataclass(frozen=True, slots=True)
class FileEntry:
    path: str
    sha256: str
    size: int
    mode: int = 0o644


@dataclass(frozen=True, slots=True)
class BundleManifest:
    version: str
    kind: Kind
    files: tuple[FileEntry, ...]
    base_version: str | None = None
    created_ms: float = 0.0

    def to_json(self) -> bytes:
        data = {
            "format": FORMAT,
            "version": self.version,
            "kind": self.kind,
            "base_version": self.base_version,
            "created_ms": self.created_ms,
            "files": [
                {"path": f.path, "sha256": f.sha256, "size": f.size, "mode": f.mode}
                for f in self.files
            ],
        }
        return json.dumps(data, indent=1, sort_keys=True).encode()


def check_version(version: object) -> str:
    if not isinstance(version, str) or not _VERSION_RE.match(version) or version in {".", ".."}:
        raise BundleError(f"bad release version {version!r}: expected letters, digits, '._+-'")
    return version


def release_order(version: str) -> ReleaseOrder:
    """Sort key of a release version, for refusing downgrades.

    The public part is ordered as PEP 440 (1.10.0 after 1.9.0, 1.4.0rc1 before 1.4.0); a
    local label (models releases: 1.4.0+m1) sorts after the bare version, with its numbers
    compared as numbers: 1.4.0+m10 after 1.4.0+m9, which plain PEP 440 compares as text.
    A version that cannot be ordered is a BundleError rather than a guess.
    """
    try:
        parsed = Version(version)
    except InvalidVersion:
        raise BundleError(f"release version {version!r} cannot be ordered: use a PEP 440 "
                          "version such as 1.4.0, 1.4.0rc1 or 1.4.0+m1") from None
    local = tuple((0, int(run), "") if run.isdigit() else (1, 0, run)
                  for run in re.findall(r"[0-9]+|[a-z]+", parsed.local or ""))
    return Version(parsed.public), local


def check_relpath(path: object) -> str:
    """A payload path: relative, POSIX, no '.', '..' or empty parts."""
    if not isinstance(path, str) or not path or "\\" in path or "\0" in path:
        raise BundleError(f"bad payload path {path!r}")
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise BundleError(f"bad payload path {path!r}: must be relative without '.' or '..'")
    return path


def parse_manifest(raw: bytes) -> BundleManifest:
    """Parse manifest.json (call only after its signature checked out)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"manifest.json is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"manifest format must be {FORMAT}")
    kind = data.get("kind")
    if kind not in ("full", "models"):
        raise BundleError(f"manifest kind {kind!r}: expected 'full' or 'models'")
    base = data.get("base_version")
    files_raw = data.get("files")
    if not isinstance(files_raw, list):
        raise BundleError("manifest 'files' must be a list")
    files: list[FileEntry] = []
    seen: set[str] = set()
    for i, item in enumerate(files_raw):
        try:
            entry = FileEntry(path=check_relpath(item["path"]), sha256=str(item["sha256"]).lower(),
                              size=int(item["size"]), mode=int(item.get("mode", 0o644)))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"manifest files[{i}]: {exc}") from None
        if not re.fullmatch(r"[0-9a-f]{64}", entry.sha256) or entry.size < 0:
            raise BundleError(f"manifest files[{i}] ({entry.path}): bad sha256 or size")
        if entry.mode & ~0o755:
            raise BundleError(f"manifest files[{i}] ({entry.path}): mode {oct(entry.mode)}")
        if entry.path in seen:
            raise BundleError(f"manifest lists {entry.path} twice")
        seen.add(entry.path)
        files.append(entry)
    if kind == "models" and any(not f.path.startswith("engines/") for f in files):
        raise BundleError("a models bundle may only carry files under engines/")
    return BundleManifest(version=check_version(data.get("version")), kind=kind, files=tuple(files),
                    base_version=None if base is None else check_version(base),
                    created_ms=float(data.get("created_ms", 0.0)))


def load_public_keys(path: Path) -> list[Ed25519PublicKey]:
    """Every ed25519 key in a PEM file (several allow key rotation)."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read public key {path}: {exc}") from None
    marker = b"-----BEGIN PUBLIC KEY-----"
    keys: list[Ed25519PublicKey] = []
    for chunk in text.split(marker)[1:]:
        try:
            key = serialization.load_pem_public_key(marker + chunk)
        except ValueError as exc:
            raise BundleError(f"{path}: not a PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise BundleError(f"{path}: not an ed25519 key")
        keys.append(key)
    if not keys:
        raise BundleError(f"{path}: no public key in it")
    return keys


def verify_signature(manifest_raw: bytes, signature_b64: bytes,
                     keys: Sequence[Ed25519PublicKey]) -> None:
    try:
        signature = base64.b64decode(signature_b64.strip(), validate=True)
    except ValueError:
        raise BundleError("manifest.sig is not base64") from None
    for key in keys:
        try:
            key.verify(signature, manifest_raw)
        except InvalidSignature:
            continue
        return
    raise BundleError("bad signature: manifest.json is not signed by a trusted key")


def _read_member(tf: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    if not member.isfile() or member.size > limit:
        raise BundleError(f"{member.name}: not a regular file of at most {limit} bytes")
    handle = tf.extractfile(member)
    if handle is None:  # pragma: no cover - isfile() was checked
        raise BundleError(f"{member.name}: unreadable")
    return handle.read()


def extract_verified(bundle: Path, keys: Sequence[Ed25519PublicKey], dest: Path) -> Verified:
    """Check `bundle` and write its payload under `dest` (an empty, new directory)."""
    try:
        with tarfile.open(bundle, "r:*") as tf:
            return _extract(tf, keys, dest)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise BundleError(f"{bundle.name}: unreadable or truncated archive ({exc})") from None


def _extract(tf: tarfile.TarFile, keys: Sequence[Ed25519PublicKey], dest: Path) -> Verified:
    members = tf.getmembers()  # reads to the end: a truncated archive fails here
    by_name: dict[str, tarfile.TarInfo] = {}
    for m in members:
        name = m.name[2:] if m.name.startswith("./") else m.name
        if name in by_name:
            raise BundleError(f"archive holds {name} twice")
        by_name[name] = m
    try:
        raw = _read_member(tf, by_name[MANIFEST_NAME], _MAX_MANIFEST_BYTES)
        sig = _read_member(tf, by_name[SIGNATURE_NAME], 1024)
    except KeyError as exc:
        raise BundleError(f"archive has no {exc.args[0]}") from None
    verify_signature(raw, sig, keys)
    manifest = parse_manifest(raw)
    wanted = {f"{PAYLOAD_DIR}/{f.path}": f for f in manifest.files}
    for name, m in by_name.items():
        if name in (MANIFEST_NAME, SIGNATURE_NAME) or (m.isdir() and _is_payload_dir(name)):
            continue
        if name not in wanted:
            raise BundleError(f"archive holds {name}, which the manifest does not list")
    for name, entry in wanted.items():
        member = by_name.get(name)
        if member is None:
            raise BundleError(f"{entry.path}: listed in the manifest but missing from the archive")
        _extract_file(tf, member, entry, dest)
    return Verified(manifest, raw, sig)


def _is_payload_dir(name: str) -> bool:
    name = name.rstrip("/")
    return name == PAYLOAD_DIR or (name.startswith(PAYLOAD_DIR + "/")
                                   and bool(check_relpath(name[len(PAYLOAD_DIR) + 1:])))


def _extract_file(tf: tarfile.TarFile, member: tarfile.TarInfo, entry: FileEntry,
                  dest: Path) -> None:
    if not member.isfile():
        raise BundleError(f"{entry.path}: not a regular file in the archive (links refused)")
    if member.size != entry.size:
        raise BundleError(f"{entry.path}: {member.size} bytes, manifest says {entry.size}")
    src = tf.extractfile(member)
    if src is None:  # pragma: no cover - isfile() was checked
        raise BundleError(f"{entry.path}: unreadable")
    target = dest.joinpath(*PurePosixPath(entry.path).parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    written = 0
    with target.open("xb") as out:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
            written += len(chunk)
    if written != entry.size:
        raise BundleError(f"{entry.path}: truncated ({written} of {entry.size} bytes)")
    if digest.hexdigest() != entry.sha256:
        raise BundleError(f"{entry.path}: sha256 mismatch (got {digest.hexdigest()[:16]}…, "
                          f"manifest says {entry.sha256[:16]}…)")
    target.chmod(entry.mode)


# --- building (release engineering; tools/make_bundle.py) ---------------------------------


def _walk_payload(root: Path) -> Iterable[tuple[str, Path]]:
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise BundleError(f"{rel}: only regular files and folders go into a bundle")
        if path.is_file():
            yield check_relpath(rel), path


def link_or_copy(src: str, dst: str) -> str:
    """A hard link where the file system allows, else a copy (a `copy_function` for
    shutil.copytree: staging a payload, assembling a models release)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def build_manifest(payload_dir: Path, version: str, kind: Kind,
                   base_version: str | None = None) -> BundleManifest:
    files = tuple(
        FileEntry(path=rel, sha256=sha256_file(p), size=p.stat().st_size,
                  mode=0o755 if p.stat().st_mode & 0o111 else 0o644)
        for rel, p in _walk_payload(payload_dir))
    release_order(check_version(version))  # devices refuse a version they cannot order
    manifest = BundleManifest(version=version, kind=kind, files=files,
                        base_version=base_version, created_ms=time.time() * 1000.0)
    parse_manifest(manifest.to_json())  # same checks the device will make
    return manifest


def write_bundle(payload_dir: Path, manifest: BundleManifest, private_key: Ed25519PrivateKey,
                 out: Path) -> Path:
    """Sign `manifest` and write the bundle (gzip tar) to `out`."""
    raw = manifest.to_json()
    signature = base64.b64encode(private_key.sign(raw)) + b"\n"
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w:gz", format=tarfile.PAX_FORMAT) as tf:
        for name, data in ((MANIFEST_NAME, raw), (SIGNATURE_NAME, signature)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = int(manifest.created_ms / 1000)
            tf.addfile(info, io.BytesIO(data))
        for entry in manifest.files:
            src = payload_dir.joinpath(*PurePosixPath(entry.path).parts)
            info = tf.gettarinfo(str(src), arcname=f"{PAYLOAD_DIR}/{entry.path}")
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            with src.open("rb") as fh:
                tf.addfile(info, fh)
    tmp.replace(out)
    return out


def generate_keypair() -> tuple[bytes, bytes]:
    """A new ed25519 signing key: (private PEM, public PEM)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path}: not an ed25519 private key")
    return key
