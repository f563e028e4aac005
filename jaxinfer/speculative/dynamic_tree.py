"""EAGLE-2 dynamic draft trees: the proposer and its tree-growing attention live in
`jaxinfer.speculative.proposers.eagle_tree`; this module names them where they were first
imported from."""

from jaxinfer.speculative.proposers.eagle_tree import (EagleTree, _TreeDraftCache,
                                                       _TreeDraftLayer, check_shape)

__all__ = ["EagleTree", "_TreeDraftCache", "_TreeDraftLayer", "check_shape"]
