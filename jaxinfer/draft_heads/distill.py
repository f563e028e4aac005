"""Self-distillation: training data the base model writes itself, with the batch engine.

Draft heads serve the model's own outputs, so they learn best from them. Two sources:
`windows` — prompts cut from a token stream (text data), each continued greedily; `chat` —
conversations, whose last reply the model writes anew from the conversation before it (rendered
by its chat template). Both run `jaxinfer generate`'s job in a work directory, so an interrupted
run resumes where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def regenerate(model: str, prompts: list[list[int]], workdir: str | Path, *, new_tokens: int,
               batch_size: int = 16, separator: int | None = None, dtype: str = "auto",
               progress: bool = True) -> list[tuple[list[int], list[int]]]:
  """(prompt, the model's greedy continuation) of every prompt, in order, by `model` (a
  directory) in `dtype` (`jaxinfer generate`'s --dtype: the base the heads train on);
  `separator` (EOS) ends each continuation that did not end by itself."""
  from jaxinfer.runner import generate_file
  work = Path(workdir)
  work.mkdir(parents=True, exist_ok=True)
  path = work / "distill_prompts.jsonl"
  path.write_text("".join(json.dumps({"id": i, "prompt_ids": [int(t) for t in p]}) + "\n"
                          for i, p in enumerate(prompts)))
  out = work / "distill_outputs.jsonl"
  generate_file(str(path), str(out), model, max_new_tokens=new_tokens, batch_size=batch_size,
                mesh="data:1", dtype=dtype, progress=progress)
  records = sorted((json.loads(l) for l in out.read_text().splitlines()), key=lambda r: r["id"])
  if len(records) != len(prompts) or any("error" in r for r in records):
    bad = next((r for r in records if "error" in r), None)
    raise ValueError(f"self-distillation: the model could not continue every prompt"
                     f"{'' if bad is None else ': ' + str(bad['error'])}")
  pairs = []
  for p, r in zip(prompts, records):
    reply = list(r["completion_ids"])
    if separator is not None and (not reply or reply[-1] != separator):
      reply.append(separator)
    pairs.append((list(p), reply))
  return pairs


def windows(model: str, tokens: np.ndarray, workdir: str | Path, *, num_prompts: int,
            prompt_len: int = 64, new_tokens: int = 128, batch_size: int = 16,
            seed: int = 0, dtype: str = "auto", progress: bool = True) -> np.ndarray:
  """Training tokens the base model writes itself: `num_prompts` windows of `tokens` as
  prompts, each continued greedily by the batch engine. Returns prompt + completion of every
  window, concatenated in order."""
  if len(tokens) <= prompt_len:
    raise ValueError(f"self-distillation: {len(tokens)} tokens cannot fill {prompt_len}-token "
                     f"prompts")
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, len(tokens) - prompt_len, size=num_prompts)
  pairs = regenerate(model, [tokens[s:s + prompt_len] for s in starts], workdir,
                     new_tokens=new_tokens, batch_size=batch_size, dtype=dtype,
                     progress=progress)
  return np.concatenate([np.concatenate([p, c]) for p, c in pairs]).astype(np.int32)


def chat(model: str, conversations: list[list[dict[str, Any]]], template, tokenizer,
         workdir: str | Path, *, num_prompts: int, new_tokens: int = 256,
         batch_size: int = 16, eos_id: int | None = None, seed: int = 0, dtype: str = "auto",
         progress: bool = True) -> np.ndarray:
  """Training tokens from conversations: for `num_prompts` of them (all when fewer; else a
  sample fixed by `seed`), the conversation up to its last reply, rendered with the generation
  prompt, and the reply the model writes to it (ended by `eos_id`). Earlier replies in a
  conversation stay as given."""
  from jaxinfer.chat import reply_prompt
  if not conversations:
    raise ValueError("self-distillation: no conversations")
  picked = range(len(conversations))
  if num_prompts < len(conversations):
    picked = sorted(np.random.default_rng(seed).choice(len(conversations), num_prompts,
                                                       replace=False))
  prompts = []
  for i in picked:
    context = reply_prompt(conversations[i])
    if not context:
      raise ValueError(f"self-distillation: conversation {i} has no turn before its reply")
    prompts.append(tokenizer.encode(template.render(context, add_generation_prompt=True),
                                    add_special_tokens=False))
  pairs = regenerate(model, prompts, workdir, new_tokens=new_tokens, batch_size=batch_size,
                     separator=eos_id, dtype=dtype, progress=progress)
  return np.concatenate([np.concatenate([p, c]) for p, c in pairs]).astype(np.int32)
