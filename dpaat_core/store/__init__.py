"""The run store: run folders and their tables, locks, liveness, loading a run's model, importing models."""
