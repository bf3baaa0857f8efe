"""Scale-out with JAX's own machinery: a device Mesh, named shardings, XLA's SPMD
partitioner, and jax.distributed across hosts. See docs/parallel.md."""
