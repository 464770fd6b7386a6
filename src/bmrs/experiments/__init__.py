"""Experiments built on the training engine: post-training sweeps, compaction reports, reproductions."""
