#!/usr/bin/env python3
"""Make and sign conveyor-vision release bundles (release engineering, not the device).

    # once: a signing key pair; the private key stays off the devices
    tools/make_bundle.py keygen --private signing.pem --public update-signing.pub

    # a full release: stage wheels/, engines/, config/ in a folder, then
    pip wheel --wheel-dir stage/wheels '.[realsense]'
    cp -r engines stage/engines && mkdir -p stage/config
    cp systemd/conveyor-vision.example.yaml stage/config/
    tools/make_bundle.py build --version 1.4.0 --key signing.pem --out dist/cv-1.4.0.cvb stage

    # a full release for `models.backend: tensorrt` (JetPack 6): TensorRT comes from JetPack
    # (the venv sees the system site-packages), cuda-python for CUDA 12 from the bundle
    pip wheel --wheel-dir stage/wheels '.[realsense]' \
        $(tools/make_bundle.py requirements --backend tensorrt)
    tools/make_bundle.py build --backend tensorrt --version 1.4.0 --key signing.pem \
        --out dist/cv-1.4.0-trt.cvb stage

    # a models-only release (only engines/ files; the device keeps its venv)
    tools/make_bundle.py build --kind models --base-version 1.4.0 --version 1.4.0+m1 \
        --key signing.pem --out dist/cv-1.4.0+m1.cvb models-stage

    # a models release of a candidate folder (`edge-node train --out CANDIDATE`, or any
    # folder laid out as engines/ with its manifest.yaml): packed as engines/, after its
    # manifest and every file it names check out
    tools/make_bundle.py build --kind models --base-version 1.4.0 --version 1.4.0+m2 \
        --key signing.pem --out dist/cv-1.4.0+m2.cvb CANDIDATE

Devices trust the public key in /etc/conveyor-vision/update-signing.pub.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

from edge.infer.manifest import ManifestError, load_manifest, sha256_file
from edge.infer.plans import CUDA_PYTHON_REQUIREMENT
from edge.update.bundle import (
    BundleError,
    build_manifest,
    generate_keypair,
    link_or_copy,
    load_private_key,
    write_bundle,
)

#: A models folder (engines/, a candidate) has its manifest at the top.
MODELS_MANIFEST = "manifest.yaml"
#: What a full bundle's wheels/ must hold beyond the node and its own dependencies, per
#: `models.backend` (the device installs every wheel offline, so nothing else gets there).
BACKEND_REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "onnxruntime": (),
    "tensorrt": (CUDA_PYTHON_REQUIREMENT,),
}


def check_backend_wheels(wheels: Path, backend: str) -> None:
    """BundleError unless `wheels` holds a wheel satisfying each of the backend's requirements."""
    found: dict[str, list[str]] = {}
    for path in sorted(wheels.glob("*.whl")) if wheels.is_dir() else []:
        try:
            name, version, _build, _tags = parse_wheel_filename(path.name)
        except InvalidWheelFilename:
            continue
        found.setdefault(name, []).append(str(version))
    for line in BACKEND_REQUIREMENTS[backend]:
        req = Requirement(line)
        have = found.get(canonicalize_name(req.name), [])
        if not any(req.specifier.contains(v, prereleases=True) for v in have):
            seen = f" (found {', '.join(have)})" if have else ""
            raise BundleError(f"{wheels}: backend {backend} needs a wheel for {line!r}{seen}: "
                              f"pip wheel --wheel-dir {wheels} '{line}'")


def _requirements(args: argparse.Namespace) -> int:
    for line in BACKEND_REQUIREMENTS[args.backend]:
        print(line)
    return 0


def _keygen(args: argparse.Namespace) -> int:
    if args.private.exists() and not args.force:
        print(f"{args.private} exists; --force to overwrite", file=sys.stderr)
        return 1
    private, public = generate_keypair()
    fd = os.open(args.private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private)
    args.public.write_bytes(public)
    print(f"private key: {args.private} (keep it secret, off the devices)")
    print(f"public key:  {args.public} (install as /etc/conveyor-vision/update-signing.pub)")
    return 0


def check_models(folder: Path) -> str:
    """BundleError unless `folder/manifest.yaml` loads and every file it names (models,
    gallery seed, golden set) has its recorded sha256; returns the manifest's sha256, the
    key of the device's shadow record for these models."""
    path = folder / MODELS_MANIFEST
    try:
        manifest = load_manifest(path)  # the models' sha256 and the manifest's shape
    except ManifestError as exc:
        raise BundleError(str(exc)) from None
    for key in ("gallery_seed", "golden"):
        entry = manifest.raw.get(key)
        if not isinstance(entry, dict) or "file" not in entry:
            continue
        named = folder / str(entry["file"])
        if not named.is_file() or sha256_file(named) != str(entry.get("sha256")):
            raise BundleError(f"{named}: missing, or not the sha256 {path} names for {key}")
    return sha256_file(path)


@contextlib.contextmanager
def models_payload(folder: Path) -> Iterator[Path]:
    """A folder laid out as engines/ (a candidate) staged as the payload `engines/...` of a
    models bundle, with hard links where the file system allows."""
    with tempfile.TemporaryDirectory(prefix="cv-models-") as tmp:
        stage = Path(tmp) / "payload"
        shutil.copytree(folder, stage / "engines", copy_function=link_or_copy)
        yield stage


def _build(args: argparse.Namespace) -> int:
    try:
        candidate = (args.payload / MODELS_MANIFEST).is_file()
        if candidate and args.kind != "models":
            raise BundleError(f"{args.payload} is a models folder (its manifest.yaml at the "
                              "top): build it with --kind models")
        with contextlib.ExitStack() as stack:
            payload = args.payload
            if candidate:
                print(f"{args.payload}: models manifest sha256 {check_models(args.payload)}")
                payload = stack.enter_context(models_payload(args.payload))
            elif args.kind == "models" and (args.payload / "engines" / MODELS_MANIFEST).is_file():
                check_models(args.payload / "engines")
            manifest = build_manifest(payload, args.version, args.kind, args.base_version)
            if not manifest.files:
                raise BundleError(f"{args.payload} holds no files")
            if manifest.kind == "full":
                check_backend_wheels(payload / "wheels", args.backend)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_bundle(payload, manifest, load_private_key(args.key), args.out)
    except (BundleError, OSError, ValueError) as exc:
        print(f"make_bundle: {exc}", file=sys.stderr)
        return 1
    size = sum(f.size for f in manifest.files)
    print(f"{args.out}: {manifest.kind} release {manifest.version}, "
          f"{len(manifest.files)} files, {size / 1e6:.1f} MB")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    keygen = sub.add_parser("keygen", help="make an ed25519 signing key pair")
    keygen.add_argument("--private", type=Path, required=True)
    keygen.add_argument("--public", type=Path, required=True)
    keygen.add_argument("--force", action="store_true")
    keygen.set_defaults(func=_keygen)
    build = sub.add_parser("build", help="make and sign a bundle from a staged folder")
    build.add_argument("payload", type=Path, help="folder: wheels/, engines/, config/ ...; "
                       "or, with --kind models, a candidate folder (its manifest.yaml at the "
                       "top), packed as engines/")
    build.add_argument("--version", required=True)
    build.add_argument("--kind", choices=["full", "models"], default="full")
    build.add_argument("--base-version", default=None,
                       help="models bundles: only apply on top of this release")
    build.add_argument("--key", type=Path, required=True, help="private signing key (PEM)")
    build.add_argument("--out", type=Path, required=True)
    build.add_argument("--backend", choices=sorted(BACKEND_REQUIREMENTS), default="onnxruntime",
                       help="the devices' models.backend: full bundles for tensorrt must carry "
                       f"a {CUDA_PYTHON_REQUIREMENT} wheel (JetPack 6 is CUDA 12)")
    build.set_defaults(func=_build)
    reqs = sub.add_parser("requirements",
                          help="print the extra requirements a backend's wheels/ must hold")
    reqs.add_argument("--backend", choices=sorted(BACKEND_REQUIREMENTS), required=True)
    reqs.set_defaults(func=_requirements)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
