"""Weight quantization formats: a frozen `QuantFormat` parsed from names like "int4:g128".

A format is the element type, the scale layout (one scale per output channel, or per group of
`group` elements along the weight's declared group axis) and which optional roles (embeddings,
LM head, norms) are quantized besides the linear weights of attention and MLP.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxinfer.params import QUANT_ROLES

# name -> qwix qtype (QArray.qtype, the logical element type). Scales are symmetric absmax
# (qwix) except ternary (absmean).
KINDS = {
    "int8": jnp.int8,
    "int4": jnp.int4,
    "int2": "int2",  # qwix's synthetic int2: levels -2..1 (absmax bound 1.5)
    "ternary": jnp.int2,  # BitNet b1.58: {-1, 0, +1} x absmean scale
    "fp8_e4m3": jnp.float8_e4m3fn,
    "fp8_e5m2": jnp.float8_e5m2,
    # ml_dtypes' float6 types: jax 0.10.2's XLA has no 6-bit primitive type ("Invalid XLA
    # PrimitiveType"), so their values are rounded on the 6-bit grid here (ops.round_to_float)
    # and packed as their codes (or held in the 8-bit type that holds every one of them)
    "fp6_e2m3": jnp.float6_e2m3fn,
    "fp6_e3m2": jnp.float6_e3m2fn,
    "fp4_e2m1": jnp.float4_e2m1fn,
}
OPTIONAL_ROLES = tuple(r for r in QUANT_ROLES if r != "linear")
INTEGER_KINDS = ("int8", "int4", "int2", "ternary")

# Storage. qwix holds qvalue in the logical type itself (its "int2" in an int4 array). jax's own
# sub-byte arrays are not used for storage: with jax 0.10.2 on CPU an executable compiled ahead
# of time (`.lower().compile()`, as the engine and Generator do) for mesh-sharded int4/int2/fp4
# inputs requires a packed sub-byte layout those arrays do not have, and refuses them; and on
# CPU they take a byte per element anyway (and XLA here has no 6-bit type at all). Instead the
# sub-byte types are packed by hand into uint8 (`PACKED_BITS`: two int4 or fp4 values, or four
# int2/ternary values, per byte, four fp6 values per three bytes, along the last axis; the float
# types as their codes; ops.pack), the same bytes on every backend, on disk and in memory,
# unpacked where a weight is used. A weight whose last axis does not divide into the words is
# held in one-byte containers (`CONTAINERS`), values unchanged.
PACKED_BITS = {jnp.dtype(jnp.int4): 4, jnp.dtype(jnp.int2): 2,
               jnp.dtype(jnp.float4_e2m1fn): 4, jnp.dtype(jnp.float6_e2m3fn): 6,
               jnp.dtype(jnp.float6_e3m2fn): 6}
# e4m3 holds every e2m1 and e2m3 value (3 mantissa bits, a wider exponent), e5m2 every e3m2 one
CONTAINERS = {jnp.dtype(jnp.int4): jnp.int8, jnp.dtype(jnp.int2): jnp.int8,
              jnp.dtype(jnp.float4_e2m1fn): jnp.float8_e4m3fn,
              jnp.dtype(jnp.float6_e2m3fn): jnp.float8_e4m3fn,
              jnp.dtype(jnp.float6_e3m2fn): jnp.float8_e5m2}
ROUNDED_HERE = ("fp6_e2m3", "fp6_e3m2")  # kinds no XLA array holds: see ops.round_to_float


class IncludeError(ValueError):
  """What a format's include (the optional roles it quantizes) names wrongly."""


@dataclasses.dataclass(frozen=True)
class QuantFormat:
  kind: str  # a key of KINDS
  group: int | None = None  # elements per scale along the group axis; None: per channel
  include: tuple[str, ...] = ()  # OPTIONAL_ROLES quantized besides the linear weights
  # int8 activations too (":a8"): each linear weight's input quantized per token (absmax over
  # what the weight contracts), the product taken in integers
  activations: bool = False

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"quantization format {self.kind!r}: unknown; expected one of "
                       f"{', '.join(KINDS)}, optionally :gN for groups of N (e.g. int4:g128) and "
                       f":a8 for int8 activations")
    if self.group is not None and self.group < 2:
      raise ValueError(f"quantization format {self.name}: groups need at least 2 elements")
    if self.activations and self.kind not in INTEGER_KINDS:
      raise ValueError(f"quantization format {self.name}: int8 activations (:a8) need integer "
                       f"weights ({', '.join(INTEGER_KINDS)}), so that the product is taken in "
                       f"integers")
    bad = sorted(set(self.include) - set(OPTIONAL_ROLES))
    if bad:
      raise IncludeError(f"quantization include {bad}: expected some of "
                         f"{', '.join(OPTIONAL_ROLES)}")
    object.__setattr__(self, "include", tuple(r for r in OPTIONAL_ROLES if r in self.include))

  @classmethod
  def parse(cls, text: str, include=()) -> "QuantFormat":
    """"int8", "int4:g128", "ternary", "fp8_e4m3", "int8:a8", ...; one-line ValueError
    otherwise."""
    kind, *options = text.strip().split(":")
    group, activations = None, False
    for option in options:
      if option[:1] == "g" and option[1:].isascii() and option[1:].isdigit() and group is None:
        group = int(option[1:])
      elif option == "a8" and not activations:
        activations = True
      else:
        raise ValueError(f"quantization format {text!r}: expected KIND, KIND:gN with N the "
                         f"group size (e.g. int4:g128), or KIND:a8 for int8 activations")
    return cls(kind, group, tuple(include), activations)

  @property
  def name(self) -> str:
    return (self.kind + ("" if self.group is None else f":g{self.group}")
            + (":a8" if self.activations else ""))

  @property
  def qtype(self):
    return KINDS[self.kind]

  def for_model(self, tie_embeddings: bool) -> "QuantFormat":
    """This format as a model takes it: one that ties its LM head to its embeddings has no
    lm_head of its own (embed quantizes both, so lm_head beside it is dropped; alone, an
    IncludeError)."""
    if "lm_head" not in self.include or not tie_embeddings:
      return self
    if "embed" not in self.include:
      raise IncludeError(f"quantization include {list(self.include)}: the model ties its LM "
                         f"head to its embeddings (it has no lm_head of its own); include embed "
                         f"to quantize them")
    return dataclasses.replace(self, include=tuple(r for r in self.include if r != "lm_head"))

  def __str__(self) -> str:
    return self.name
