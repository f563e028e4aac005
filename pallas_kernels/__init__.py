"""jaxinfer's Pallas kernels, one folder per op, each with a jnp reference of the same signature."""
