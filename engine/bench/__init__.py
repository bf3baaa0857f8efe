"""`engine bench`: workloads, the offline runner, and the HF transformers baseline."""
