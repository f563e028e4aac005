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


def __getattr__(name: str):
  if name not in _NAMES:
    raise AttributeError(f"module 'jaxinfer' has no attribute {name!r}")
  return getattr(importlib.import_module(_NAMES[name]), name)


def __dir__():
  return __all__
