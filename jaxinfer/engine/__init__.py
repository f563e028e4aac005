"""The continuous-batching engine: paged KV cache with prefix sharing, chunked prefill mixed
with decode, fixed-shape steps."""

from jaxinfer.engine.engine import Engine, EngineConfig, EngineStats
from jaxinfer.engine.pages import PagePool
from jaxinfer.engine.scheduler import EngineRequest, EngineResult

__all__ = ["Engine", "EngineConfig", "EngineRequest", "EngineResult", "EngineStats", "PagePool"]
