"""Training helpers for `tools/train_models.py` (torch; never imported by the node)."""
