"""Draft proposers: given each row's committed tokens, a draft tree of T nodes per row. Each
implements `jaxinfer.speculative.protocol.Proposer`; its drafts are either deterministic (q =
None: exact verification treats them as distinct top-k drafts) or sampled from a draft
distribution q it returns.

- `NGram` (prompt lookup, `ngram`): the continuation of the latest earlier occurrence of the
  last n tokens in prompt + output; a chain.
- `Lookahead` (a Lookahead-style trie, `lookahead`): the continuations of the best earlier
  matches of the last tokens, merged into a trie and cut to `num_nodes`; a tree per row.
- `Recycling` (Token Recycling, `recycling`): an adjacency matrix of each token's most likely
  successors, refreshed from every verification's logits, expanded breadth-first.
- `DraftModel` (`draft_model`): a separate small model with its own KV cache drafts a chain; the
  target with layers skipped (`layer_skip_draft`) is SWIFT-style self-speculation.
- `Medusa`, `Hydra` (`medusa`, `hydra`): draft heads on the target's hidden state drafting a
  static tree (Hydra's children depend on their branch; Hydra++ adds a prefix layer).
- `Eagle`, `EagleTree` (`eagle`, `eagle_tree`): the EAGLE draft layer over the target's
  features drafting a chain, or growing EAGLE-2 dynamic trees.
"""

from jaxinfer.speculative.proposers.common import chain_parents, shrink, tree_parents
from jaxinfer.speculative.proposers.draft_model import DraftModel, layer_skip_draft
from jaxinfer.speculative.proposers.eagle import Eagle
from jaxinfer.speculative.proposers.eagle_tree import EagleTree
from jaxinfer.speculative.proposers.hydra import Hydra
from jaxinfer.speculative.proposers.lookahead import Lookahead
from jaxinfer.speculative.proposers.medusa import Medusa
from jaxinfer.speculative.proposers.ngram import NGram
from jaxinfer.speculative.proposers.pending import EagleState
from jaxinfer.speculative.proposers.recycling import Recycling
from jaxinfer.speculative.protocol import Context, Draft, Proposer, Weights

__all__ = ["Context", "Draft", "DraftModel", "Eagle", "EagleState", "EagleTree", "Hydra",
           "Lookahead", "Medusa", "NGram", "Proposer", "Recycling", "Weights", "chain_parents",
           "layer_skip_draft", "shrink", "tree_parents"]
