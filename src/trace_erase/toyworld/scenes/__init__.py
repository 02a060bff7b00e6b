"""Scene toy world: two-slot pictures (left/right), their captions, a per-slot scorer and scene-erasure metrics."""
