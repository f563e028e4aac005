"""From options to a model ready to serve: its weights loaded onto the first replica's mesh, its
tokenizer and chat template, and the engines that will run its requests."""

from __future__ import annotations

import dataclasses

from jaxinfer import checkpoint, quant
from jaxinfer.errors import UserError
from jaxinfer.options import ServeOptions
from jaxinfer.serving import placement
from jaxinfer.serving.backends import EngineBackend
from jaxinfer.sparsity import parse as parse_sparsity, window_conflict


def load(opts: ServeOptions):
  """(model config, params, tokenizer or None, chat template or None, backend, sparsity)."""
  from jaxinfer.speculative import registry
  replicas, total = placement.replicas(opts.mesh)
  dtype = None if opts.dtype == "auto" else opts.dtype
  try:
    cfg, params, tokenizer = checkpoint.load_model(
        opts.model, dtype, replicas[0].mesh, cache_dir=opts.cache_dir,
        quiet=not opts.progress)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(str(e)) from None
  if opts.max_seq_len is not None:
    cfg = dataclasses.replace(cfg, max_seq_len=opts.max_seq_len)
  if opts.speculating and quant.quantizes_activations(params):
    raise UserError(f"--speculative: {opts.model} quantizes activations (:a8), and rounding "
                    f"them turns the last-bit differences between verifying a draft and "
                    f"decoding it into different tokens: speculation would not equal plain "
                    f"decoding; use a weight-only quantization for it")
  sparsity = parse_sparsity(opts.sparsity)
  if why := window_conflict(sparsity, cfg):
    raise UserError(f"--sparsity: {opts.model} {why}")
  from jaxinfer.attention import unsupported
  why = unsupported(sparsity, opts.implementation,
                    placement.first_device(replicas[0].mesh).platform)
  if why:
    raise UserError(f"--sparsity: {why}")
  chat = None
  if tokenizer is not None:
    from jaxinfer.chat import ChatTemplate
    chat = ChatTemplate.from_dir(checkpoint.resolve_model_dir(opts.model, opts.cache_dir, True))
  proposer, draft_params = (registry.build(opts, cfg, params, dtype) if opts.speculating
                            else (None, None))
  draft_cfg = getattr(proposer, "cfg", None)  # (a draft model attends with the target's pattern)
  if draft_cfg is not None and (why := window_conflict(sparsity, draft_cfg)):
    raise UserError(f"--sparsity: the draft model {why}")
  backend = EngineBackend(opts, cfg, params, replicas, total, sparsity, proposer, draft_params)
  return cfg, params, tokenizer, chat, backend, sparsity
