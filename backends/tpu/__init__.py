"""TPU backend: Pallas ragged paged attention (see docs/tpu.md)."""
