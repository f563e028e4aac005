"""A thin wrapper over a `tokenizers.Tokenizer` read from a model directory's tokenizer.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import tokenizers


class Tokenizer:

  def __init__(self, tok: tokenizers.Tokenizer, add_bos_token: bool | None = None,
               bos_token: str | None = None):
    self._tok = tok
    self._bos_id = tok.token_to_id(bos_token) if (add_bos_token and bos_token) else None

  @classmethod
  def from_dir(cls, directory: str | os.PathLike) -> "Tokenizer | None":
    """The directory's tokenizer, or None when it has no tokenizer.json."""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.exists():
      return None
    try:
      tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # (the tokenizers library raises a bare Exception)
      raise ValueError(f"{path}: not a tokenizer the tokenizers library reads ({e})") from None
    add_bos, bos = None, None
    cfg_path = directory / "tokenizer_config.json"
    if cfg_path.exists():
      try:
        tcfg = json.loads(cfg_path.read_text())
      except ValueError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
      if not isinstance(tcfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object")
      add_bos = tcfg.get("add_bos_token")
      bos = tcfg.get("bos_token")
      if isinstance(bos, dict):
        bos = bos.get("content")
    return cls(tok, add_bos, bos)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def first_difference(self, other: "Tokenizer") -> str | None:
    """Where `other` gives a token another id (or has none for it), in words; None where both
    map every token to the same id."""
    mine, theirs = self._tok.get_vocab(with_added_tokens=True), \
        other._tok.get_vocab(with_added_tokens=True)
    for token, i in sorted(mine.items(), key=lambda kv: kv[1]):
      if theirs.get(token) != i:
        return f"token {token!r} is id {i} in one and {theirs.get(token)} in the other"
    extra = sorted(set(theirs) - set(mine), key=theirs.get)
    return f"token {extra[0]!r} is in one only" if extra else None

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids as the model saw them in training: the tokenizer's own special-token template,
    plus BOS where tokenizer_config.json asks for it and the template did not add it.
    add_special_tokens=False: the text's tokens alone (text a chat template wrote, which holds
    the special tokens it wants)."""
    ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
    if not add_special_tokens:
      return ids
    if self._bos_id is not None and (not ids or ids[0] != self._bos_id):
      ids = [self._bos_id] + ids
    return ids

  def decode(self, ids: list[int]) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=True)

  def token_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)
