"""Block-sparse flash attention (forward + backward) over static or dynamic block masks."""

from pallas_kernels.block_sparse_attention import masks
from pallas_kernels.block_sparse_attention.kernel import BlockSizes, block_sparse_attention
from pallas_kernels.block_sparse_attention.masks import MaskInfo, mask_info
from pallas_kernels.block_sparse_attention.reference import (block_sparse_attention_reference,
                                                             dense_mask)

__all__ = ["BlockSizes", "MaskInfo", "block_sparse_attention", "block_sparse_attention_reference",
           "dense_mask", "mask_info", "masks"]
