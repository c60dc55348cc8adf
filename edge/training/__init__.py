"""Model training on CPU with torch (the `train` extra): the frozen backbone, the damage head,
cached features, packaging into a manifest, model cards.

Only training commands import this package (`tools/train_models.py`, `edge-node train`);
the running node never does, so it needs no torch.
"""
