"""Text sources for training, turned into one token stream (documents separated by EOS).

--data is a text file, a directory of them, or JSONL: one document per line, either
{"text": ...} or a conversation {"messages": [{"role", "content"}, ...]} rendered by the model's
chat template (jaxinfer/chat.py); a file may mix the two."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jaxinfer.output import decode_line
from jaxinfer.requests import InvalidRequest, load_line
from jaxinfer.tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".py", ".md")


def iter_jsonl(path: str | os.PathLike):
  """(line number, record) of each non-blank JSONL line: a dict with a string 'text' or a
  valid 'messages' list, else a ValueError naming the line."""
  from jaxinfer.chat import check_messages
  with open(path, "rb") as f:
    for i, raw in enumerate(f, start=1):
      try:
        line = decode_line(raw, i)
      except ValueError as e:
        raise ValueError(f"--data: {path} line {i} is {e}") from None
      if not line.strip():
        continue
      try:
        rec = load_line(line)
      except InvalidRequest as e:
        raise ValueError(f"--data: {path} line {i} is {e}") from None
      if isinstance(rec, dict) and "messages" in rec:
        check_messages(rec["messages"], f"--data: {path} line {i}")
      elif not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
        raise ValueError(f"--data: {path} line {i} has no string 'text' field and no "
                         f"'messages' list")
      yield i, rec


def is_jsonl(path: str | os.PathLike) -> bool:
  return Path(path).suffix.lower() == ".jsonl" and Path(path).is_file()


def iter_documents(path: str | os.PathLike, chat=None):
  """(text, rendered) of each document: `rendered` for a conversation written out by the chat
  template `chat` (a `jaxinfer.chat.ChatTemplate`), whose text already holds its special
  tokens."""
  path = Path(path)
  if path.is_dir():
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    if not files:
      raise FileNotFoundError(f"--data: {path} has no {'/'.join(TEXT_SUFFIXES)} files")
    for f in files:
      yield f.read_text(encoding="utf-8", errors="replace"), False
  elif is_jsonl(path):
    for i, rec in iter_jsonl(path):
      if "messages" not in rec:
        yield rec["text"], False
      elif chat is None:
        raise ValueError(f"--data: {path} line {i} is a conversation; reading it needs the "
                         f"model's chat template")
      else:
        yield chat.render(rec["messages"]), True
  elif path.is_file():
    yield path.read_text(encoding="utf-8", errors="replace"), False
  else:
    raise FileNotFoundError(f"--data: {path} does not exist")


def load_text_tokens(path: str | os.PathLike, tokenizer: Tokenizer, eos_id: int | None,
                     chat=None, vocab_size: int | None = None) -> np.ndarray:
  """--data's documents as one token array, each followed by `eos_id`; ValueError where the
  tokenizer gives an id past the model's `vocab_size` (its embedding would read as NaN)."""
  dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
  out = []
  for text, rendered in iter_documents(path, chat):
    out.append(np.asarray(tokenizer.encode(text, add_special_tokens=not rendered), dtype))
    if eos_id is not None:
      out.append(np.asarray([eos_id], dtype))
  if not out:
    raise ValueError(f"--data: {path} holds no documents")
  tokens = np.concatenate(out)
  if vocab_size is not None and len(tokens) and int(tokens.max()) >= vocab_size:
    raise ValueError(f"--model: its tokenizer.json gives token id {int(tokens.max())} for "
                     f"--data, past the model's vocabulary of {vocab_size}: not this model's "
                     f"tokenizer")
  return tokens
