"""A thin wrapper over a `tokenizers.Tokenizer` read from a model directory's tokenizer.json."""

from __future__ import annotations

import os
from pathlib import Path

import tokenizers

from jaxinfer.files import read_json_object


# prompt ids a completion is decoded after (enough to hold a word and a character's bytes)
CONTEXT_IDS = 8
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")


def tokenizer_config(directory: str | os.PathLike) -> dict:
  """The directory's tokenizer_config.json ({} without one)."""
  return read_json_object(Path(directory) / "tokenizer_config.json", missing_ok=True)


def special_tokens(directory: str | os.PathLike) -> dict[str, str]:
  """The named special tokens ({"bos_token": "<s>", ...}), as transformers reads them:
  tokenizer_config.json's over special_tokens_map.json's; a token given as {"content": ...}
  read as its content."""
  named = {}
  for source in (read_json_object(Path(directory) / "special_tokens_map.json", missing_ok=True),
                 tokenizer_config(directory)):
    for name in SPECIAL_TOKENS:
      value = source.get(name)
      value = value.get("content") if isinstance(value, dict) else value
      if isinstance(value, str) and value:
        named[name] = value
  return named


class Tokenizer:

  def __init__(self, tok: tokenizers.Tokenizer, add_bos_token: bool | None = None,
               bos_token: str | None = None):
    self._tok = tok
    self._special_ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
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
    add_bos = tokenizer_config(directory).get("add_bos_token")
    return cls(tok, add_bos, special_tokens(directory).get("bos_token"))

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

  def decode(self, ids: list[int], context: list[int] = ()) -> str:
    """The text of `ids` (special tokens skipped). After `context`, the ids before them (a
    completion's prompt): the text they add to it, so that prompt + completion reads as the
    whole. (Decoded alone, a SentencePiece-style tokenizer drops the space that begins a text:
    "▁cat" is "cat" at the start, " cat" after "the".)"""
    ids = list(ids)
    tail = [i for i in context if i not in self._special_ids][-CONTEXT_IDS:]
    if tail:
      before = self._tok.decode(tail, skip_special_tokens=True)
      text = self._tok.decode(tail + ids, skip_special_tokens=True)
      if text.startswith(before):  # (not where the ids finish a character the context began)
        return text[len(before):]
    return self._tok.decode(ids, skip_special_tokens=True)

  def special_in(self, text: str) -> str | None:
    """A special token that `text` holds (which decoded text never does: `decode` skips them),
    or None."""
    for token in self._tok.get_added_tokens_decoder().values():
      if token.special and token.content and token.content in text:
        return token.content
    return None

  def token_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)
