"""The platform JAX starts on, where libtpu is installed but no TPU is attached."""

from __future__ import annotations

import functools
import glob
import os


@functools.cache
def skip_an_absent_tpu() -> None:
  """With libtpu installed (the `tpu-aot` extra, for `jaxinfer compile`) on a host with no TPU
  chip, JAX starts libtpu's runtime anyway, which fails after printing a screen of warnings (no
  metadata server, no TPU workers) and half a second, and JAX then computes on the CPU: so the
  CPU at once. Left to JAX where $JAX_PLATFORMS or $JAX_FORCE_TPU_INIT is set, JAX's platforms
  were chosen in code or its backends have started, a TPU chip is on the PCI bus (JAX's own test
  of a TPU host) or a TPU device file is there (/dev/accel*, /dev/vfio/: a container may hide the
  bus), or a GPU (which JAX names, where its plugin is missing) or a GPU plugin is. Called by
  every command and on the first use of a name of the Python API (`jaxinfer.LLM`, ...), before
  either touches a device."""
  import importlib.metadata
  import importlib.util
  if (os.environ.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in os.environ
      or importlib.util.find_spec("libtpu") is None):
    return
  if (importlib.metadata.entry_points(group="jax_plugins")
      or importlib.util.find_spec("jax_plugins") is not None):
    return
  if any(map(glob.glob, ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/vfio/devices/vfio*",
                         "/dev/kfd"))):  # (TPU devices, sysfs or not; an AMD GPU)
    return
  try:
    from jax._src import hardware_utils, xla_bridge
    if (hardware_utils.num_available_tpu_chips_and_device_id()[0]
        or hardware_utils.has_visible_nvidia_gpu()  # (without its plugin: JAX says so)
        or xla_bridge.backends_are_initialized()):
      return
  except Exception:  # (JAX's private tests moved: leave the choice to JAX)
    return
  import jax
  if not jax.config.jax_platforms:
    jax.config.update("jax_platforms", "cpu")
