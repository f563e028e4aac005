"""A matmul through integer weights (int8, or int4 packed two per byte), dequantized tile by tile
in VMEM: what a decode step needs on a TPU, where XLA materialises each dequantized weight; and
its transposed form, for a tied embedding table as the LM head."""

from pallas_kernels.quantized_matmul.kernel import fits, k_minor, quantized_matmul
from pallas_kernels.quantized_matmul.reference import (quantized_matmul_reference,
                                                       quantized_matmul_t_reference, unpack_int4)
from pallas_kernels.quantized_matmul.transposed import fits_t, quantized_matmul_t

__all__ = ["fits", "fits_t", "k_minor", "quantized_matmul", "quantized_matmul_reference",
           "quantized_matmul_t", "quantized_matmul_t_reference", "unpack_int4"]
