"""Benchmarks over methods and concepts: the bench, its tables and the multi-concept bench."""
