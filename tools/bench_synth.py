"""Benchmark: how fast the synthetic conveyor renders RGB-D frames on one core.

    python tools/bench_synth.py [--frames 600] [--json PATH]

Renders the default two-camera rig (640x480) at the demo's item rate, one
frame after another in one thread, and reports frames/s with the median and
p99 per-frame time. Target (issue: foundation): >= 60 frames/s on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from edge.catalogue import load_catalogue
from edge.config import load_config
from edge.sim.conveyor import SyntheticConveyor


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=600, help="frames per camera")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import cv2

    cv2.setNumThreads(1)  # one core: OpenCV must not spread over the other
    cfg = load_config(None)
    world = SyntheticConveyor(cfg.synthetic, cfg.belt, cfg.cameras, load_catalogue(), 0.0)
    times = []
    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    for k in range(args.frames):
        for cam in world.camera_ids:
            t0 = time.perf_counter()
            world.render(cam, k)
            times.append((time.perf_counter() - t0) * 1000.0)
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    n = len(times)
    result = {
        "frames": n,
        "resolution": f"{cfg.cameras[0].width}x{cfg.cameras[0].height}",
        "frames_per_s_wall": round(n / wall, 1),
        "frames_per_s_cpu": round(n / cpu, 1),
        "frame_ms": {"p50": round(float(np.percentile(times, 50)), 2),
                     "p99": round(float(np.percentile(times, 99)), 2)},
        "items_per_second": cfg.synthetic.items_per_second,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
