"""Weight quantization on qwix's QArray: formats, the one quantize function, PTQ conversion of a
parameter tree, the QAT view of it, and the checkpoint metadata of a quantized model."""

from jaxinfer.quant.formats import KINDS, OPTIONAL_ROLES, IncludeError, QuantFormat
from jaxinfer.quant.linear import WeightKernel, linear
from jaxinfer.quant.ops import (ActQuantized, dequantize, fake_quant, holds_quantized, is_qarray,
                                is_quantized, logical_shape, quantize, quantizes_activations,
                                scale_axes, take_rows, weight)
from jaxinfer.quant.tree import (QUANT_FILE, QUANT_VERSION, abstract_quantized, metadata_text,
                                 qat_params, quantize_params, read_metadata, selected_specs,
                                 write_metadata)

__all__ = ["KINDS", "OPTIONAL_ROLES", "IncludeError", "QuantFormat", "ActQuantized", "dequantize",
           "fake_quant", "holds_quantized", "linear", "WeightKernel", "quantizes_activations",
           "is_qarray", "is_quantized", "logical_shape", "quantize", "scale_axes", "take_rows",
           "weight",
           "QUANT_FILE", "QUANT_VERSION", "abstract_quantized", "metadata_text", "qat_params",
           "quantize_params", "read_metadata", "selected_specs", "write_metadata"]
