"""The toy world: procedurally rendered shapes, the small SD- and FLUX-format pipelines trained on them, and the
classifier that scores what they draw, so the whole erase → evaluate loop runs offline on a CPU."""
