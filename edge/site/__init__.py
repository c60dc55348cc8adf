"""A site of many lines: what the nodes of one site share through its broker (the fleet view,
the shared gallery)."""
