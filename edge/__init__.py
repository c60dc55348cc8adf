"""conveyor-vision edge node: finds damaged items on a conveyor before the divert point."""

import os

# The gallery search is one small matrix product per crop: OpenBLAS's default of one thread
# per core makes it 2-4x slower on a 2-core device busy with capture and ONNX Runtime. This
# must be set before numpy loads; an explicit setting in the environment wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
