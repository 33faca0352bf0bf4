"""Runtime helpers shared by both stages: atomic file writes, cross-process locks, safe file names."""
