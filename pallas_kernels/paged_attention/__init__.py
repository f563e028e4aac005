"""Paged decode attention: split-K over KV pages, GQA heads folded into the matmul rows."""

from pallas_kernels.paged_attention.kernel import default_num_splits, paged_attention
from pallas_kernels.paged_attention.reference import (dequantize_pages, gather_pages,
                                                      paged_attention_reference)

__all__ = ["default_num_splits", "dequantize_pages", "gather_pages", "paged_attention",
           "paged_attention_reference"]
