"""Per-sample gradient features: the hooks, the projectors, the featurization loop."""
