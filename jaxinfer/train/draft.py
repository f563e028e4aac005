"""Draft-head training from Python: `jaxinfer.train_draft(model, data, output, method=...)` —
what `jaxinfer train-draft` runs, with its flags as keywords. Trains Medusa-1 heads, Medusa-2
(heads and a LoRA-adapted base), Hydra / Hydra++ heads or an EAGLE draft layer on a frozen
model, resumable from its workdir, and writes the heads with their measured held-out accuracies
(for Medusa and Hydra, the static tree built from them)."""

from __future__ import annotations

import dataclasses
import inspect
import os
from pathlib import Path
from typing import Any

from jaxinfer.errors import UserError

METHODS = ("medusa", "medusa2", "hydra", "eagle")


@dataclasses.dataclass(frozen=True)
class TrainDraftResult:
  """path: the heads' directory (serve with `LLM(model, speculative=..., draft_heads=path)`;
  Medusa-2's adapted model is at info["model"]); info: what the heads file records (held-out
  accuracies, tree, training set-up)."""

  path: Path
  info: dict[str, Any]


def chat_data(path: str):
  """The conversations of a chat JSONL data file, None for text data; a file mixing the two
  cannot be self-distilled."""
  from jaxinfer.train.data import is_jsonl, iter_jsonl
  if not is_jsonl(path):
    return None
  records = [rec for _, rec in iter_jsonl(path)]
  chats = [rec["messages"] for rec in records if "messages" in rec]
  if chats and len(chats) < len(records):
    raise UserError(f"--data: {path} mixes text and conversations; --self_distill takes one "
                    f"kind")
  return chats or None


def _check(method, prefix_layer, head_layers, ttt_steps, draft_vocab, hidden_cache, steps,
           batch_size, seq_len, heldout_fraction, num_heads, given: set[str]) -> None:
  """Refuses bad values, and options the method would ignore (`given`: the options set to
  other than `train_draft`'s defaults)."""
  if method not in METHODS:
    raise UserError(f"--method: expected one of {METHODS}, got {method!r}")
  if method == "eagle" and given & {"num_heads", "tree_nodes"}:
    raise UserError("--num_heads, --tree_nodes: Medusa and Hydra options (EAGLE drafts with one "
                    "layer; its tree is chosen when serving: --tree)")
  if method != "medusa2" and given & {"lora_rank", "kl_weight"}:
    raise UserError("--lora_rank, --kl_weight: Medusa-2 options (--method=medusa2)")
  if "self_distill" not in given and given & {"distill_prompt_len", "distill_new_tokens"}:
    raise UserError("--distill_prompt_len, --distill_new_tokens: apply to self-distillation; "
                    "pass --self_distill=N too")
  if method != "hydra" and (prefix_layer or head_layers != 1):
    raise UserError("--prefix_layer, --head_layers: Hydra options (--method=hydra)")
  if method != "eagle" and (ttt_steps != 1 or draft_vocab):
    raise UserError("--ttt_steps, --draft_vocab: EAGLE options (--method=eagle)")
  if hidden_cache and method == "medusa2":
    raise UserError("--hidden_cache: Medusa-2 trains the model itself, so its hidden states "
                    "cannot be cached")
  for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1),
                           ("seq_len", seq_len, 4)):
    if value < low:
      raise UserError(f"--{name}: must be >= {low}, got {value}")
  # the last head (EAGLE's last training-time-test step) learns from tokens that far ahead: a
  # window no longer gave it none (a NaN loss and accuracy)
  ahead, flag = (ttt_steps, "--ttt_steps") if method == "eagle" else (num_heads, "--num_heads")
  if seq_len <= ahead:
    raise UserError(f"--seq_len: must exceed {flag}={ahead}, got {seq_len}")
  if not 0.0 <= heldout_fraction <= 0.5:
    raise UserError(f"--heldout_fraction: must be in [0, 0.5], got {heldout_fraction}")


def _tokens(data, src, cfg, tokenizer, workdir, *, self_distill, distill_prompt_len,
            distill_new_tokens, seed, dtype, progress):
  """The training tokens: --data's, or (self_distill) the continuations of it by the model in
  `src` (in `dtype`, as the heads' base)."""
  from jaxinfer.chat import ChatTemplate
  from jaxinfer.draft_heads import distill
  from jaxinfer.train.data import load_text_tokens
  if tokenizer is None:
    raise UserError(f"--model: {src} has no tokenizer.json; training on text needs one")
  eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else None
  conversations = chat_data(data) if self_distill else None
  if conversations:  # the model writes each conversation's last reply anew
    return distill.chat(str(src), conversations, ChatTemplate.from_dir(src), tokenizer,
                        workdir / "distill", num_prompts=self_distill,
                        new_tokens=distill_new_tokens, eos_id=eos, seed=seed, dtype=dtype,
                        progress=progress)
  tokens = load_text_tokens(data, tokenizer, eos, ChatTemplate.from_dir(src), cfg.vocab_size)
  if self_distill:
    tokens = distill.windows(str(src), tokens, workdir / "distill", num_prompts=self_distill,
                             prompt_len=distill_prompt_len, new_tokens=distill_new_tokens,
                             seed=seed, dtype=dtype, progress=progress)
  return tokens


def _check_other_heads(output: str, method: str) -> None:
  """Refuses an output holding another method's heads: written beside them, the two would be
  mixed (one's weights file read as the other's)."""
  from jaxinfer.draft_heads import eagle_serve, hydra_serve, medusa_serve
  mine = "medusa" if method == "medusa2" else method  # (medusa2 writes Medusa heads)
  for other, lib in (("medusa", medusa_serve), ("hydra", hydra_serve), ("eagle", eagle_serve)):
    if other != mine and (Path(output).expanduser() / lib.CONFIG).is_file():
      raise ValueError(f"--output: {output} holds {other} heads ({lib.CONFIG}); writing "
                       f"{method} heads beside them would mix the two: choose another "
                       f"directory or empty it")


def _check_base(base, method: str, model: str) -> None:
  """Refuses a quantized base the heads could not be trained on or served with."""
  from jaxinfer import quant
  if quant.quantizes_activations(base):
    raise ValueError(f"--model: {model} quantizes activations (:a8), which rules out speculative "
                     f"decoding: heads trained on it could never be served; use a weight-only "
                     f"quantization")
  if method == "medusa2" and quant.holds_quantized(base):
    raise ValueError(f"--method=medusa2: its LoRA adapters train the base's own weights, and "
                     f"{model}'s are quantized; train medusa2 on the full-precision model, or "
                     f"medusa, hydra or eagle on this one")


def _check_finite(weights, learning_rate: float) -> None:
  """A diverged run (weights no longer finite) ends here, before anything reaches --output (it
  wrote heads of NaN, and exited 0)."""
  import jax
  import jax.numpy as jnp
  floats = [x for x in jax.tree.leaves(weights) if jnp.issubdtype(x.dtype, jnp.floating)]
  if not all(bool(jnp.isfinite(x).all()) for x in floats):
    raise UserError(f"--learning_rate: training diverged (weights no longer finite); nothing "
                    f"was written to --output: train again with a lower --learning_rate (now "
                    f"{learning_rate}) in a new --workdir")


def train_draft(model: str, data: str, output: str, *, method: str = "medusa",
                workdir: str | None = None, resume: bool = False, dtype: str = "auto",
                mesh: str = "", cache_dir: str | None = None, num_heads: int = 4,
                tree_nodes: int = 16, prefix_layer: bool = False, head_layers: int = 1,
                ttt_steps: int = 1, draft_vocab: int = 0, lora_rank: int = 8,
                kl_weight: float = 10.0, steps: int = 600, batch_size: int = 16,
                seq_len: int = 256, learning_rate: float = 3e-3, warmup_steps: int = 30,
                checkpoint_every: int = 100, heldout_fraction: float = 0.05,
                self_distill: int = 0, distill_prompt_len: int = 64,
                distill_new_tokens: int = 128, hidden_cache: str | None = None, seed: int = 0,
                progress: bool = True) -> TrainDraftResult:
  """Trains draft heads on the frozen `model` from `data` (text, a directory of it, or JSONL of
  text or conversations) and writes them to `output`; keywords are `jaxinfer train-draft`'s
  flags (see `jaxinfer train-draft --help`). Raises UserError on bad options or files."""
  from jaxinfer import checkpoint
  from jaxinfer.checkpoint.destination import check_destination
  from jaxinfer.draft_heads import eagle, files, hidden_cache as hcache, hydra, medusa, medusa2
  from jaxinfer.sharding import format_mesh, mesh_flag
  from jaxinfer.train.workdir import check_data, check_workdir, record_settings
  # ("~/heads": where check_destination looks, not a directory named "~" here)
  output, workdir, hidden_cache = (p if p is None else os.path.expanduser(p)
                                   for p in (output, workdir, hidden_cache))
  values = locals()
  parameters = inspect.signature(train_draft).parameters
  options = {name: values[name] for name in parameters}  # (as the run records them)
  given = {name for name, p in parameters.items()
           if p.default is not inspect.Parameter.empty and options[name] != p.default}
  _check(method, prefix_layer, head_layers, ttt_steps, draft_vocab, hidden_cache, steps,
         batch_size, seq_len, heldout_fraction, num_heads, given)
  try:
    check_destination(output, None)  # (not empty or a file: before hours of training)
    _check_other_heads(output, method)
    work = Path(workdir or output.rstrip("/") + ".run")
    check_workdir(work, resume, options)
    device_mesh = mesh_flag(mesh)
    src = checkpoint.resolve_model_dir(model, cache_dir)
    cfg, base, tokenizer = checkpoint.load_model(str(src), None if dtype == "auto" else dtype,
                                                 device_mesh)
    _check_base(base, method, model)
    if seq_len > cfg.max_seq_len:
      raise ValueError(f"--seq_len: {seq_len} is past the model's context ({cfg.max_seq_len} "
                       f"positions)")
    if draft_vocab and draft_vocab >= cfg.vocab_size:  # (it drafted over the whole, unsaid)
      raise ValueError(f"--draft_vocab: {draft_vocab} is not below {model}'s vocabulary of "
                       f"{cfg.vocab_size}; leave it out to draft over the whole vocabulary")
    record_settings(work, options)
    tokens = _tokens(data, src, cfg, tokenizer, work, self_distill=self_distill,
                     distill_prompt_len=distill_prompt_len,
                     distill_new_tokens=distill_new_tokens, seed=seed, dtype=dtype,
                     progress=progress)
    check_data(work, tokens, data)
    n_held = int(len(tokens) * heldout_fraction)
    if len(tokens) - n_held <= seq_len + 1:
      raise ValueError(f"--data: {len(tokens)} tokens cannot fill --seq_len={seq_len}")
    train_tokens, held_tokens = tokens[:len(tokens) - n_held], tokens[len(tokens) - n_held:]
    if hidden_cache:  # built (or checked against this model and data) before training
      hcache.build(hidden_cache, base, cfg, train_tokens, seq_len, batch_size=batch_size,
                   progress=progress)
  except (OSError, ValueError) as e:
    raise UserError(str(e)) from None
  common = dict(steps=steps, batch_size=batch_size, seq_len=seq_len,
                learning_rate=learning_rate, warmup_steps=warmup_steps,
                checkpoint_every=checkpoint_every, seed=seed, mesh=device_mesh,
                progress=progress)
  heads_only = dict(common, hidden_cache=hidden_cache)
  if method == "eagle":
    heads, vocab, info = eagle.train_eagle(cfg, base, train_tokens, held_tokens, work,
                                           draft_vocab=draft_vocab, ttt_steps=ttt_steps,
                                           **heads_only)
    save = lambda out, draft, i: eagle.save(out, draft, i, vocab)
  elif method == "medusa2":
    heads, base, info = medusa2.train_medusa2(
        cfg, base, train_tokens, held_tokens, work, num_heads=num_heads, tree_nodes=tree_nodes,
        rank=lora_rank, kl_weight=kl_weight, **common)
    _check_finite((heads, base), learning_rate)
    info["model"] = str(checkpoint.save_hf(Path(output) / "model", cfg, base,  # (adapted)
                                           tokenizer_dir=src).resolve())
    save = medusa.save
  else:
    lib = medusa if method == "medusa" else hydra
    extra = {"prefix_layer": prefix_layer, "head_layers": head_layers} if lib is hydra else {}
    heads, info = lib.train_heads(cfg, base, train_tokens, held_tokens, work,
                                  num_heads=num_heads, tree_nodes=tree_nodes, **heads_only,
                                  **extra)
    save = lib.save
  _check_finite(heads, learning_rate)
  # (Medusa-2's base: the model adapted with its heads, under --output)
  info.update(base_model=info.get("model", str(Path(src).resolve())),
              base=files.base_record(cfg, base),
              self_distilled_prompts=self_distill, mesh=format_mesh(dict(device_mesh.shape)))
  return TrainDraftResult(Path(save(output, heads, info)), info)
