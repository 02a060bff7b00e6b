"""The two engines every method is a configuration of: closed form (stage A) and trajectory (stage B)."""
