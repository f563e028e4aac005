"""The JSONL request contract of `jaxinfer generate`: parse and validate one input line into a
`Request`, or into an error record that names the line and what was wrong with it. The prompt is
text ('prompt'), token ids ('prompt_ids') or a conversation ('messages', rendered by the model's
chat template with the generation prompt: the completion is the assistant's reply)."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from typing import Any

from jaxinfer.sampling import validate as validate_sampling
from jaxinfer.tokenizer import Tokenizer

FIELDS = {"id", "prompt", "prompt_ids", "messages", "max_new_tokens", "temperature", "top_k", "top_p",
          "min_p", "stop", "metadata"}


@dataclasses.dataclass(frozen=True)
class Defaults:
  """Run-wide values (from flags) that a record may override."""

  max_new_tokens: int = 128
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  stop: tuple[str, ...] = ()


@dataclasses.dataclass
class Request:
  id: Any
  line: int
  prompt_ids: list[int]
  max_new_tokens: int
  temperature: float
  top_k: int
  top_p: float
  min_p: float
  stop: tuple[str, ...]
  metadata: Any = None
  n: int = 1  # samples (completions) of this prompt
  seed: int = 0  # each sample's key derives from (seed, id, sample index)


class InvalidRequest(ValueError):
  pass


def error_record(line: int, message: str, request_id: Any = None) -> dict[str, Any]:
  return {"id": request_id, "line": line, "error": message}


def is_integer(x) -> bool:
  """An integer (a Python or NumPy one), not a bool."""
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_number(x) -> bool:
  """A finite real number, not a bool."""
  return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _get(rec: dict, name: str, default, check, expected: str):
  if name not in rec or rec[name] is None:
    return default
  value = rec[name]
  if not check(value):
    raise InvalidRequest(f"{name}: expected {expected}, got {json.dumps(value)[:80]}")
  return value


def parse_request(line_no: int, text: str, defaults: Defaults, tokenizer: Tokenizer | None,
                  vocab_size: int, max_seq_len: int, chat=None, *, n: int = 1,
                  seed: int = 0) -> Request:
  """Raises InvalidRequest with a message fit for the user. `chat`: the model's
  `jaxinfer.chat.ChatTemplate`, for 'messages' prompts."""
  return make_request(line_no, load_line(text), defaults, tokenizer, vocab_size, max_seq_len,
                      chat, n=n, seed=seed)


def _finite(text: str) -> float:
  value = float(text)
  if not math.isfinite(value):
    raise ValueError(f"{text} is out of a float's range")
  return value


def _no_constant(name: str):
  raise ValueError(f"{name} is not a JSON number")


def load_line(text: str):
  """A JSONL line's value, strict JSON: InvalidRequest for anything else, including NaN,
  Infinity, a number out of float range, an integer too long for Python to read and nesting too
  deep (each a traceback through `json.loads` alone)."""
  try:
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite)
  except json.JSONDecodeError as e:
    raise InvalidRequest(f"not valid JSON: {e.msg} at column {e.colno}") from None
  except RecursionError:
    raise InvalidRequest("not valid JSON: nested too deeply") from None
  except ValueError as e:
    raise InvalidRequest(f"not valid JSON: {e}") from None


def is_text(x) -> bool:
  """Whether `x` is a string that UTF-8 can hold (JSON's escapes and Python's strings can
  also spell unpaired surrogates, which no text holds)."""
  if not isinstance(x, str):
    return False
  try:
    x.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def _surrogate(x, where: str) -> str | None:
  """Where in a decoded record a string holds an unpaired surrogate (None: nowhere)."""
  if isinstance(x, str):
    return None if is_text(x) else where
  if isinstance(x, dict):
    items = x.items()
  elif isinstance(x, (list, tuple)):
    items = enumerate(x)
  else:
    return None
  for k, v in items:
    name = f"{where}[{k!r}]" if where else str(k)
    bad = _surrogate(k, name) or _surrogate(v, name)
    if bad:
      return bad
  return None


def make_request(line_no: int, rec: Any, defaults: Defaults, tokenizer: Tokenizer | None,
                 vocab_size: int, max_seq_len: int, chat=None, *, n: int = 1,
                 seed: int = 0) -> Request:
  """A request from one decoded record (a JSONL line, or a prompt given to `jaxinfer.LLM`)."""
  if not isinstance(rec, dict):
    raise InvalidRequest(f"expected a JSON object, got {type(rec).__name__}")
  bad = _surrogate(rec, "")
  if bad:
    raise InvalidRequest(f"{bad}: holds an unpaired surrogate (a \\ud800-\\udfff escape "
                         f"alone), which is not text")
  unknown = sorted(set(rec) - FIELDS)
  if unknown:
    raise InvalidRequest(f"unknown field(s) {unknown}; allowed: {sorted(FIELDS)}")
  if "id" not in rec:
    raise InvalidRequest("missing 'id'")
  rid = rec["id"]
  if not (isinstance(rid, str) or is_integer(rid)):
    raise InvalidRequest(f"id: expected a string or integer, got {json.dumps(rid)[:80]}")
  has_text, has_ids = rec.get("prompt") is not None, rec.get("prompt_ids") is not None
  has_chat = rec.get("messages") is not None
  if has_text + has_ids + has_chat != 1:
    raise InvalidRequest("expected exactly one of 'prompt' (text), 'prompt_ids' (token ids) or "
                         "'messages' (a conversation)")
  if has_chat:
    from jaxinfer.chat import check_messages
    if tokenizer is None or chat is None:
      raise InvalidRequest("messages: a conversation needs the model's tokenizer.json")
    try:
      prompt_ids = tokenizer.encode(chat.render(check_messages(rec["messages"], "messages"),
                                                add_generation_prompt=True),
                                    add_special_tokens=False)
    except ValueError as e:
      raise InvalidRequest(str(e)) from None
  elif has_text:
    if not isinstance(rec["prompt"], str):
      raise InvalidRequest(f"prompt: expected a string, got {type(rec['prompt']).__name__}")
    if tokenizer is None:
      raise InvalidRequest("prompt: text needs a tokenizer and the model has no tokenizer.json; "
                           "send 'prompt_ids' instead")
    prompt_ids = tokenizer.encode(rec["prompt"])
  else:
    prompt_ids = rec["prompt_ids"]
    if not isinstance(prompt_ids, list) or not all(is_integer(t) for t in prompt_ids):
      raise InvalidRequest("prompt_ids: expected a list of integers")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
      raise InvalidRequest(f"prompt_ids: token id {bad[0]} is outside the vocabulary "
                           f"[0, {vocab_size})")
  if not prompt_ids:
    raise InvalidRequest("prompt is empty (0 tokens)")
  if len(prompt_ids) >= max_seq_len:
    raise InvalidRequest(f"prompt has {len(prompt_ids)} tokens; the model's context is "
                         f"{max_seq_len}, which leaves no room to generate")

  max_new = _get(rec, "max_new_tokens", defaults.max_new_tokens, lambda v: is_integer(v) and v >= 1,
                 "an integer >= 1")
  temperature = float(_get(rec, "temperature", defaults.temperature, is_number, "a number"))
  top_k = _get(rec, "top_k", defaults.top_k, is_integer, "an integer")
  top_p = float(_get(rec, "top_p", defaults.top_p, is_number, "a number"))
  min_p = float(_get(rec, "min_p", defaults.min_p, is_number, "a number"))
  problems = validate_sampling(temperature, top_k, top_p, min_p)
  if problems:
    raise InvalidRequest("; ".join(problems))
  stop = rec.get("stop", None)
  if stop is None:
    stop = defaults.stop
  elif isinstance(stop, str):
    stop = (stop,)
  elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
    stop = tuple(stop)
  else:
    raise InvalidRequest("stop: expected a string or a list of strings")
  if any(not s for s in stop):
    raise InvalidRequest("stop: stop strings must be non-empty")
  if stop and tokenizer is None:
    raise InvalidRequest("stop: stop strings need a tokenizer and the model has no tokenizer.json")
  if problem := special_stop(stop, tokenizer):
    raise InvalidRequest(f"stop: {problem}")
  # Never generate past the model's context.
  max_new = min(max_new, max_seq_len - len(prompt_ids))
  return Request(id=rid, line=line_no, prompt_ids=list(prompt_ids), max_new_tokens=max_new,
                 temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, stop=stop,
                 metadata=rec.get("metadata"), n=n, seed=seed)


def special_stop(stop: tuple[str, ...], tokenizer: Tokenizer | None) -> str | None:
  """Why a stop string can never match (it holds a special token: stop strings are found in
  the completion's text, which has none), or None."""
  for s in stop if tokenizer is not None else ():
    if token := tokenizer.special_in(s):
      return (f"{s!r} holds the special token {token!r}, which a completion's text never holds "
              f"(the model ends a reply with it as an end-of-sequence id: eos_token_id in its "
              f"generation_config.json)")
  return None


def truncate_at_stop(tokens: list[int], stop: tuple[str, ...], tokenizer: Tokenizer,
                     context: list[int] = ()) -> tuple[list[int], str, bool]:
  """(ids up to the token that completes the earliest stop string, text before it, found), the
  text decoded after `context` (the prompt's ids)."""
  decode = lambda ids: tokenizer.decode(ids, context)
  text = decode(tokens)
  hits = [(text.find(s), s) for s in stop if s in text]
  if not hits:
    return tokens, text, False
  start, s = min(hits)
  end = start + len(s)
  lo, hi = 1, len(tokens)  # smallest k whose decoded prefix reaches the end of the stop string
  while lo < hi:
    mid = (lo + hi) // 2
    prefix = decode(tokens[:mid])
    if len(prefix) >= end and s in prefix:
      hi = mid
    else:
      lo = mid + 1
  return tokens[:lo], text[:start], True
