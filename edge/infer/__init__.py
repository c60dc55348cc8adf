"""Inference: the models' backends, the reference gallery, the item inspector.

The node uses `ItemInspector.load(models_cfg, catalogue)`, `inspector.infer(records)`,
`inspector.learn_reference(product_id, colors)`, `inspector.reload()` and
`golden_self_test(inspector)`; `edge.decide.VerdictPolicy` turns the results into verdicts.
ONNX Runtime and TensorRT are imported only when a backend of that kind is opened.
"""

from edge.infer.backend import Backend, BackendError, open_backend
from edge.infer.gallery import ReferenceGallery
from edge.infer.golden import GoldenReport, golden_self_test
from edge.infer.manifest import Manifest, ManifestError, load_manifest
from edge.infer.models import ItemInference, ItemInspector, ModelRejectedError

__all__ = [
    "Backend",
    "BackendError",
    "GoldenReport",
    "ItemInference",
    "ItemInspector",
    "Manifest",
    "ManifestError",
    "ModelRejectedError",
    "ReferenceGallery",
    "golden_self_test",
    "load_manifest",
    "open_backend",
]
