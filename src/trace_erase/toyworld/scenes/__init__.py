"""Scene toy world: two-slot pictures (left/right), their captions and a per-slot scorer. The scene-erasure metrics
are in :mod:`trace_erase.evaluation.scene_metrics`."""
