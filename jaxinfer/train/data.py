"""Text sources for training, turned into one token stream (documents separated by EOS)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from jaxinfer.tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".py", ".md")


def iter_documents(path: str | os.PathLike):
  path = Path(path)
  if path.is_dir():
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    if not files:
      raise FileNotFoundError(f"--data: {path} has no {'/'.join(TEXT_SUFFIXES)} files")
    for f in files:
      yield f.read_text(encoding="utf-8", errors="replace")
  elif path.suffix == ".jsonl":
    with open(path, encoding="utf-8") as f:
      for i, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          rec = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"--data: {path} line {i} is not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
          raise ValueError(f"--data: {path} line {i} has no string 'text' field")
        yield rec["text"]
  elif path.is_file():
    yield path.read_text(encoding="utf-8", errors="replace")
  else:
    raise FileNotFoundError(f"--data: {path} does not exist")


def load_text_tokens(path: str | os.PathLike, tokenizer: Tokenizer,
                     eos_id: int | None) -> np.ndarray:
  dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
  out = []
  for text in iter_documents(path):
    out.append(np.asarray(tokenizer.encode(text), dtype))
    if eos_id is not None:
      out.append(np.asarray([eos_id], dtype))
  if not out:
    raise ValueError(f"--data: {path} holds no documents")
  return np.concatenate(out)
