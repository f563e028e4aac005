"""jaxinfer: fast LLM inference in JAX, and training of what makes it fast.

    import jaxinfer
    llm = jaxinfer.LLM("embedded", speculative="ngram")
    for out in llm.generate(["def fibonacci(n):"], jaxinfer.SamplingParams(max_new_tokens=64)):
      print(out.text)

Names load on first use, so `import jaxinfer` stays cheap and does not touch JAX's backends.
"""

import importlib

_NAMES = {
    "LLM": "jaxinfer.api", "SamplingParams": "jaxinfer.api", "RequestOutput": "jaxinfer.api",
    "Completion": "jaxinfer.api", "UserError": "jaxinfer.errors",
    "ServeOptions": "jaxinfer.options", "generate_file": "jaxinfer.runner",
    "train_draft": "jaxinfer.train.draft", "TrainDraftResult": "jaxinfer.train.draft",
    "quantize": "jaxinfer.quant.convert",
}
__all__ = sorted(_NAMES)
# functions the CLI shares: from here their errors name keywords, not flags (LLM does so itself)
_KEYWORD_ERRORS = ("generate_file", "train_draft", "quantize")


def __getattr__(name: str):
  if name not in _NAMES:
    raise AttributeError(f"module 'jaxinfer' has no attribute {name!r}")
  from jaxinfer.platform import skip_an_absent_tpu
  skip_an_absent_tpu()  # (before any of them starts JAX's backends)
  value = getattr(importlib.import_module(_NAMES[name]), name)
  if name in _KEYWORD_ERRORS:
    from jaxinfer.errors import keywords
    value = keywords()(value)
  return value


def __dir__():
  return __all__
