"""Serving on this process's devices: replicas placed on a mesh (`placement`), the schedulers
that run requests on them (`backends`) and what a run measured (`metrics`)."""
