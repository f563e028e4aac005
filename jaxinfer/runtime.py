"""Where and how a model runs: the mesh, the sharding rules, the attention implementation and the
sparsity pattern, as one value.

Every jitted step and every constructor that runs the model takes one `Runtime`, a static
argument (frozen and hashable), built once per replica by the entry point; the model's blocks
take what they need from it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
from jax.sharding import Mesh

from jaxinfer.sharding import DEFAULT_RULES, ShardingRules, constrain
from jaxinfer.sparsity import DENSE, Sparsity


@dataclasses.dataclass(frozen=True)
class Runtime:
  """mesh: one replica's devices (None: one device, unplaced); rules: logical axes -> mesh axes;
  implementation: the attention registry's key (attention.py); sparsity: the attention pattern
  (sparsity.py)."""

  mesh: Mesh | None = None
  rules: ShardingRules = DEFAULT_RULES
  implementation: str = "xla"
  sparsity: Sparsity = DENSE

  def constrain(self, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`sharding.constrain` on this mesh by these rules (a no-op off a mesh)."""
    return constrain(x, logical_axes, self.mesh, self.rules)

  def whole(self) -> "Runtime":
    """This runtime with every activation whole on each device of the mesh (rows, heads, the
    vocabulary: the rules for `batch` and the `act_*` axes dropped), its attention kernels under
    shard_map with replicated arguments: a draft model or layer whose state each device holds
    whole. Weights keep their rules, so the quantized matmul kernel multiplies a draft that
    reads the target's own shards (layer skip) where they lie."""
    kept = tuple((name, axes) for name, axes in self.rules.mapping
                 if name != "batch" and not name.startswith("act_"))
    return dataclasses.replace(self, rules=ShardingRules(kept))

  def replicated(self, fn):
    """`fn` run whole on every device (a no-op off a mesh): its arguments gathered at entry and
    every device computing the same result, no collective inside. For small per-row work
    (a verification's tree walk) that XLA would otherwise split as the kernels split rows."""
    if self.mesh is None or self.mesh.size == 1:
      return fn
    whole = jax.sharding.PartitionSpec()
    return lambda *args: jax.shard_map(fn, mesh=self.mesh, in_specs=(whole,) * len(args),
                                       out_specs=whole, check_vma=False)(*args)
