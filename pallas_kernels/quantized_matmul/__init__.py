"""A matmul through integer weights (int8, or int4 packed two per byte), dequantized tile by tile
in VMEM: what a decode step needs on a TPU, where XLA materialises each dequantized weight."""

from pallas_kernels.quantized_matmul.kernel import fits, k_minor, quantized_matmul
from pallas_kernels.quantized_matmul.reference import quantized_matmul_reference, unpack_int4

__all__ = ["fits", "k_minor", "quantized_matmul", "quantized_matmul_reference", "unpack_int4"]
