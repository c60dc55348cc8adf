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

Devices trust the public key in /etc/conveyor-vision/update-signing.pub.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

from edge.infer.plans import CUDA_PYTHON_REQUIREMENT
from edge.update.bundle import (
    BundleError,
    build_manifest,
    generate_keypair,
    load_private_key,
    write_bundle,
)

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


def _build(args: argparse.Namespace) -> int:
    try:
        manifest = build_manifest(args.payload, args.version, args.kind, args.base_version)
        if not manifest.files:
            raise BundleError(f"{args.payload} holds no files")
        if manifest.kind == "full":
            check_backend_wheels(args.payload / "wheels", args.backend)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_bundle(args.payload, manifest, load_private_key(args.key), args.out)
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
    build.add_argument("payload", type=Path, help="folder: wheels/, engines/, config/ ...")
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
