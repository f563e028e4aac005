"""Proposers by name: `check` validates a proposer's options before anything loads, `build`
makes (proposer, draft params) for a model. Options are read by attribute (`speculative`,
`num_draft_tokens`, `tree`, `draft_layers`, `draft_fallback`, `draft_model`, `draft_heads`), so a
`jaxinfer.options.ServeOptions`, a `GenerateJob` or any object with those names serves."""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np

from jaxinfer import checkpoint
from jaxinfer.errors import UserError

DEFAULT_TREE = "4,2,1,1"  # Token Recycling's branching per depth
LOOKAHEAD_NODES = 16
DYNAMIC_TREE = (16, 4, 5)  # nodes, top-k, depth
HEADS = ("medusa", "hydra", "eagle")  # proposers served from --draft_heads
DEFAULT_DRAFT_TOKENS = 4
CHAINS = ("ngram", "lookahead", "layerskip", "draft", "eagle")  # read --num_draft_tokens
TREE_FORMS = {"ngram": "no --tree", "layerskip": "no --tree", "draft": "no --tree",
              "medusa": "--tree=nodes:N", "hydra": "--tree=nodes:N",
              "eagle": "--tree=dynamic[:NODES,TOPK,DEPTH] or no --tree"}  # (--tree read)


def _int_list(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in text.split(","))
  except ValueError:
    raise ValueError(f"--draft_layers: expected comma-separated integers, got {text!r}") from None


def dynamic_tree(text: str) -> tuple[int, int, int]:
  """`dynamic` or `dynamic:NODES,TOPK,DEPTH` -> (nodes, top_k, depth)."""
  if text == "dynamic":
    return DYNAMIC_TREE
  head, _, spec = text.partition(":")
  try:
    nodes, top_k, depth = (int(x) for x in spec.split(","))
  except ValueError:
    raise ValueError(f"--tree: expected dynamic or dynamic:NODES,TOPK,DEPTH, got {text!r}"
                     ) from None
  if head != "dynamic":
    raise ValueError(f"--tree: expected dynamic or dynamic:NODES,TOPK,DEPTH, got {text!r}")
  from jaxinfer.speculative.proposers.eagle_tree import check_shape
  try:
    check_shape(nodes, top_k, depth)
  except ValueError as e:
    raise ValueError(f"--tree: {text!r}: {e}") from None
  return nodes, top_k, depth


def tree_nodes(text: str) -> int:
  """`nodes:N` -> N."""
  try:
    n = int(text.partition(":")[2])
  except ValueError:
    n = 0
  if n < 1:
    raise ValueError(f"--tree: expected nodes:N with N >= 1, got {text!r}")
  return n


def tree_branching(text: str) -> tuple[int, ...]:
  try:
    branching = tuple(int(x) for x in text.split(","))
  except ValueError:
    branching = ()
  if not branching or any(k < 1 for k in branching):
    raise ValueError(f"--tree: expected children per depth, e.g. 4,2,1,1; got {text!r}")
  return branching


# the options that only speculative decoding reads (`ServeOptions` refuses them without it)
SPECULATIVE_OPTIONS = ("num_draft_tokens", "tree", "draft_model", "draft_heads", "draft_layers",
                       "draft_fallback", "acceptance", "speculation")


def check(opts) -> None:
  """Raises UserError for options of `opts.speculative` that cannot work together, or that
  its proposer would not read."""
  if opts.speculative not in SPECULATIVE:
    raise UserError(f"--speculative: expected one of {SPECULATIVE}, got {opts.speculative!r}")
  if opts.speculative == "none":
    return
  if opts.num_draft_tokens < 1:
    raise UserError(f"--num_draft_tokens: must be >= 1, got {opts.num_draft_tokens}")
  if (opts.speculative == "draft") != (opts.draft_model is not None):
    raise UserError("--draft_model: needed with --speculative=draft, and only then")
  if (opts.speculative in HEADS) != (opts.draft_heads is not None):
    raise UserError("--draft_heads: needed with --speculative=medusa, hydra or eagle, and "
                    "only then")
  try:
    _check_tree(opts)
    if opts.draft_layers:
      if opts.speculative != "layerskip":
        raise ValueError("--draft_layers: the layers layer skip's draft keeps "
                         "(--speculative=layerskip)")
      _int_list(opts.draft_layers)
    chain = opts.speculative in CHAINS and not opts.tree.startswith("dynamic")
    if opts.num_draft_tokens != DEFAULT_DRAFT_TOKENS and not chain:
      raise ValueError(f"--num_draft_tokens: not read by {opts.speculative}'s tree (--tree "
                       f"sizes it); it applies to the chains of --speculative="
                       f"{'|'.join(CHAINS)} (eagle without --tree=dynamic)")
    if not 0.0 <= opts.draft_fallback <= 1.0:
      raise ValueError(f"--draft_fallback: must be in [0, 1], got {opts.draft_fallback}")
    if opts.draft_fallback and opts.speculative not in ("draft", "layerskip"):
      raise ValueError("--draft_fallback: Big-Little's fallback applies to a draft model "
                       "(--speculative=draft|layerskip)")
  except ValueError as e:
    raise UserError(str(e)) from None


def _check_tree(opts) -> None:
  if opts.tree.startswith("dynamic"):
    if opts.speculative != "eagle":
      raise ValueError("--tree: dynamic trees are grown by the EAGLE draft "
                       "(--speculative=eagle)")
    dynamic_tree(opts.tree)
  elif opts.tree.startswith("nodes:"):
    if opts.speculative not in ("medusa", "hydra", "lookahead"):
      raise ValueError("--tree: nodes:N re-grows the static tree of Medusa or Hydra heads "
                       "(--speculative=medusa|hydra) or sizes the lookahead trie")
    tree_nodes(opts.tree)
  elif opts.speculative == "lookahead" and opts.tree != DEFAULT_TREE:
    raise ValueError("--tree: the lookahead trie takes nodes:N")
  elif opts.speculative != "recycling" and opts.tree != DEFAULT_TREE:
    raise ValueError(f"--tree: children per depth shape Token Recycling's tree "
                     f"(--speculative=recycling); {opts.speculative} takes "
                     f"{TREE_FORMS[opts.speculative]}")
  else:
    tree_branching(opts.tree)


def _max_nodes(accuracy) -> int:
  """Nodes in the full tree of K heads and `top` ranks each."""
  k, top = accuracy.shape
  return sum(top**d for d in range(1, k + 1))


def _ngram(opts, cfg, params, dtype):
  from jaxinfer.speculative import proposers as P
  return P.NGram(num_draft_tokens=opts.num_draft_tokens), None


def _lookahead(opts, cfg, params, dtype):
  from jaxinfer.speculative import proposers as P
  nodes = tree_nodes(opts.tree) if opts.tree.startswith("nodes:") else LOOKAHEAD_NODES
  return P.Lookahead(num_nodes=nodes, depth=opts.num_draft_tokens), None


def _recycling(opts, cfg, params, dtype):
  from jaxinfer.speculative import proposers as P
  return P.Recycling(branching=tree_branching(opts.tree)), None


def _layerskip(opts, cfg, params, dtype):
  from jaxinfer.speculative import proposers as P
  keep = (_int_list(opts.draft_layers) if opts.draft_layers
          else tuple(range(max(1, cfg.num_layers // 2))))
  try:
    dcfg, dparams = P.layer_skip_draft(cfg, params, keep)
  except ValueError as e:
    raise UserError(f"--draft_layers: {e}") from None
  return P.DraftModel(dcfg, num_draft_tokens=opts.num_draft_tokens, name="layerskip",
                      fallback=opts.draft_fallback, keep=tuple(sorted(keep))), dparams


def _draft(opts, cfg, params, dtype):
  from jaxinfer.speculative import proposers as P
  from jaxinfer.tokenizer import Tokenizer
  try:
    dcfg, dparams, dtok = checkpoint.load_model(opts.draft_model, dtype,
                                                cache_dir=opts.cache_dir, quiet=True)
    tok = Tokenizer.from_dir(checkpoint.resolve_model_dir(opts.model, opts.cache_dir, True))
  except (FileNotFoundError, ValueError) as e:
    raise UserError(f"--draft_model: {str(e).removeprefix('--model: ')}") from None
  if dcfg.vocab_size != cfg.vocab_size:
    raise UserError(f"--draft_model: its vocabulary ({dcfg.vocab_size}) differs from the "
                    f"model's ({cfg.vocab_size})")
  differ = None if tok is None or dtok is None else tok.first_difference(dtok)
  if differ:  # (its drafts would be other tokens' ids: never accepted)
    raise UserError(f"--draft_model: its tokenizer is not the model's ({differ})")
  return P.DraftModel(dcfg, num_draft_tokens=opts.num_draft_tokens,
                      fallback=opts.draft_fallback), dparams


def _heads_tree(opts, cfg, params, dtype):
  """Medusa or Hydra heads with their static tree (re-grown with --tree=nodes:N)."""
  from jaxinfer.draft_heads import files
  from jaxinfer.draft_heads import hydra_serve as hydra
  from jaxinfer.draft_heads import medusa_serve as medusa
  from jaxinfer.speculative import proposers as P
  lib = medusa if opts.speculative == "medusa" else hydra
  with _heads_files(opts):
    heads, info = (medusa.load(opts.draft_heads, cfg.jnp_dtype) if lib is medusa
                   else hydra.load(opts.draft_heads, cfg.jnp_dtype, cfg))
    if (info["vocab_size"], info["hidden_size"]) != (cfg.vocab_size, cfg.embed):
      raise ValueError(f"heads for vocabulary {info['vocab_size']} / hidden "
                       f"{info['hidden_size']}, the model has {cfg.vocab_size} / {cfg.embed}")
    files.check_base(opts.draft_heads, info, cfg, params)
    paths = _tree(info["tree"], heads.num_heads, cfg.vocab_size)
    # the heads' measured accuracies: they re-grow the tree (--tree=nodes:N) and rank the paths
    # a smaller tree keeps
    acc = info.get("accuracy_topk")
    if acc is not None:
      try:
        accuracy = np.asarray(acc, np.float64)
      except (TypeError, ValueError):
        accuracy = np.zeros((0,))
      if accuracy.ndim != 2 or len(accuracy) > heads.num_heads or not accuracy.size:
        raise ValueError(f"{opts.draft_heads}: its accuracy_topk is not a row of accuracies "
                         f"per head (of {heads.num_heads})")
      acc = tuple(tuple(float(a) for a in row) for row in accuracy)
    if opts.tree.startswith("nodes:"):
      if acc is None:
        raise KeyError("accuracy_topk")
      paths = tuple(medusa.build_tree(accuracy,
                                      min(tree_nodes(opts.tree), _max_nodes(accuracy))))
  if lib is medusa:
    return P.Medusa(paths=paths, accuracy=acc), heads
  return P.Hydra(paths=paths, prefix=None if heads.prefix is None else hydra.prefix_config(cfg),
                 accuracy=acc), heads


def _eagle(opts, cfg, params, dtype):
  from jaxinfer.draft_heads import eagle_serve as eagle
  from jaxinfer.draft_heads import files
  with _heads_files(opts):
    draft, vocab, info = eagle.load(opts.draft_heads, cfg, cfg.jnp_dtype)
    files.check_base(opts.draft_heads, info, cfg, params)
  proposer = eagle_proposer(opts, cfg)
  drafted = cfg.vocab_size if vocab is None else len(vocab)
  if getattr(proposer, "top_k", 0) > drafted:
    raise UserError(f"--tree: {opts.tree} takes the top {proposer.top_k} drafts of a node, but "
                    f"{opts.draft_heads} drafts over {drafted} tokens (its draft vocabulary)")
  return proposer, eagle.serving_heads(draft, params, vocab)


@contextlib.contextmanager
def _heads_files(opts):
  """Errors reading --draft_heads as one UserError naming it."""
  try:
    yield
  except (FileNotFoundError, ValueError) as e:
    raise UserError(f"--draft_heads: {e}") from None
  except KeyError as e:  # (a config without a field the heads' method writes)
    raise UserError(f"--draft_heads: {opts.draft_heads}: its config has no {e.args[0]!r}, as "
                    f"jaxinfer train-draft writes for --speculative={opts.speculative}") from None


def _tree(paths, num_heads: int, vocab_size: int) -> tuple[tuple[int, ...], ...]:
  """A stored tree's paths (each node a path of ranks, one per head it reaches down), checked:
  every node's parent in the tree, no deeper than the heads, ranks within the vocabulary."""
  try:
    tree = tuple(tuple(int(r) for r in p) for p in paths)
  except (TypeError, ValueError):
    raise ValueError(f"its tree is not a list of paths of ranks: {paths!r}") from None
  nodes = set(tree)
  for p in tree:
    if not p or len(p) > num_heads or min(p) < 0 or max(p) >= vocab_size or (
        len(p) > 1 and p[:-1] not in nodes):
      raise ValueError(f"its tree's node {list(p)} is not a path of ranks below another node "
                       f"of the tree, within its {num_heads} heads")
  if not tree:
    raise ValueError("its tree is empty")
  return tuple(sorted(set(tree), key=lambda p: (len(p), p)))  # (parents first)


def eagle_proposer(opts, cfg):
  """EAGLE's proposer for target `cfg`: a chain of --num_draft_tokens, or EAGLE-2's dynamic
  tree (--tree=dynamic[:...])."""
  from jaxinfer.draft_heads import eagle_serve as eagle
  from jaxinfer.speculative import proposers as P
  if opts.tree.startswith("dynamic"):
    nodes, top_k, depth = dynamic_tree(opts.tree)
    return P.EagleTree(eagle.draft_config(cfg), num_nodes=nodes, top_k=top_k, depth=depth)
  return P.Eagle(eagle.draft_config(cfg), num_draft_tokens=opts.num_draft_tokens)


BUILDERS: dict[str, Callable] = {
    "ngram": _ngram, "lookahead": _lookahead, "recycling": _recycling, "draft": _draft,
    "layerskip": _layerskip, "medusa": _heads_tree, "hydra": _heads_tree, "eagle": _eagle,
}
SPECULATIVE = ("none",) + tuple(BUILDERS)


def build(opts, cfg, params, dtype):
  """(proposer, draft params or None) for `opts.speculative` on model (cfg, params); `dtype`:
  the draft model's (None: its own)."""
  if opts.speculative not in BUILDERS:
    raise UserError(f"--speculative: expected one of {SPECULATIVE}, got {opts.speculative!r}")
  return BUILDERS[opts.speculative](opts, cfg, params, dtype)
