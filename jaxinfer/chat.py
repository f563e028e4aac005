"""Chat data: conversations ({"messages": [{"role", "content"}, ...]} per JSONL line) rendered
to text by the model's own chat template.

The template is the Jinja template Hugging Face model directories ship (chat_template.jinja, else
tokenizer_config.json's "chat_template", as transformers chooses), rendered in a sandbox as
transformers renders it: the variables and helpers such templates expect (messages,
add_generation_prompt, the special tokens, raise_exception, strftime_now, tojson), loop controls
(`{% break %}`) and the `{% generation %}` block (rendered as its body). A model without one (a base model, such as the embedded one) uses
`PLAIN`: each message as "<|role|>\\ncontent\\n", the generation prompt "<|assistant|>\\n".
Rendered text is tokenized as it stands (the template writes the special tokens it wants).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

PLAIN = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
ROLES = ("system", "user", "assistant", "tool")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  source: str
  special: tuple[tuple[str, str], ...] = ()  # (bos_token, "<s>"), ...
  name: str = "plain"

  @classmethod
  def from_dir(cls, directory: str | os.PathLike) -> "ChatTemplate":
    """The model directory's chat template, or the plain one when it has none."""
    from jaxinfer.tokenizer import special_tokens, tokenizer_config
    d = Path(directory)
    special = tuple(special_tokens(d).items())
    template = tokenizer_config(d).get("chat_template")
    if isinstance(template, list):  # named templates: the default one
      named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
      if "default" not in named:  # (transformers refuses to choose, as here)
        raise ValueError(f"{d / 'tokenizer_config.json'}: its chat templates {sorted(named)} "
                         f"name none 'default'")
      template = named["default"]
    if (d / "chat_template.jinja").is_file():  # (transformers 5 saves it so, and reads it first)
      template = (d / "chat_template.jinja").read_text()
    if not template:
      return cls(PLAIN, special, "plain")
    return cls(template, special, str(d))

  @cached_property
  def _compiled(self):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
      raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_generation_extension(), "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = (
        lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
            sort_keys=sort_keys))
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(self.source)

  def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """The conversation as text; add_generation_prompt ends it where the assistant's reply
    starts. As transformers renders it: a message's keys whose value is null left out (an
    exported history's "tool_calls": null), no tools or documents. A template's own error (e.g.
    roles out of order) is raised as ValueError."""
    from jinja2.exceptions import TemplateError
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
      return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   tools=None, documents=None, **dict(self.special))
    except (TemplateError, TypeError, LookupError, AttributeError, ValueError,
            ArithmeticError, RecursionError) as e:  # (the template's code)
      raise ValueError(f"chat template ({self.name}): {e}") from None


def _generation_extension():
  """`{% generation %}...{% endgeneration %}`, which transformers' templates use to mark the
  assistant's tokens: rendered as its body."""
  from jinja2 import nodes
  from jinja2.ext import Extension

  class Generation(Extension):
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  return Generation


def check_messages(messages, where: str) -> list[dict[str, Any]]:
  """`messages` if it is a non-empty list of {"role": one of ROLES, "content": str}."""
  if not isinstance(messages, list) or not messages:
    raise ValueError(f"{where}: 'messages' must be a non-empty list")
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(
        m.get("content"), str):
      raise ValueError(f"{where}: message {i} must be {{'role': one of {list(ROLES)}, "
                       f"'content': a string}}")
  return messages


def reply_prompt(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The conversation up to the reply to regenerate: without its last message when that is the
  assistant's, else all of it (the assistant answers the last turn)."""
  return messages[:-1] if messages[-1]["role"] == "assistant" else messages
