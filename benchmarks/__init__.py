"""Benchmarks of batcher against its emulator; ``python -m benchmarks.run_all`` runs them all."""
