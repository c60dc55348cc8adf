"""Inference: the models' backends, the reference gallery, the item inspector, fusion.

The node uses `ItemInspector.load(models_cfg, catalogue)`, `inspector.infer(records)`,
`inspector.learn_reference(product_id, colors)`, `reload.prepare_reload` / `reload.switch_to`
and `golden.golden_self_test(inspector)`; `edge.verdicts.policy.VerdictPolicy` turns the
results into verdicts. ONNX Runtime and TensorRT are imported only when a backend of that
kind is opened.
"""
