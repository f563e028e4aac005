"""Tree-verification attention: draft-tree tokens over a paged KV prefix plus their ancestors."""

from pallas_kernels.tree_attention.kernel import tree_attention
from pallas_kernels.tree_attention.reference import (ancestor_matrix, pack_ancestors,
                                                     tree_attention_reference, tree_visibility,
                                                     unpack_ancestors)

__all__ = ["ancestor_matrix", "pack_ancestors", "tree_attention", "tree_attention_reference",
           "tree_visibility", "unpack_ancestors"]
