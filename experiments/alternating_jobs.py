"""Two or more settings of `jaxinfer generate`'s job over the same prompts, alternating in one
process (timings on a shared CPU drift between runs), as the batch benchmarks run them."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


def run_alternating(records: list[dict], model_dir: str, settings: dict[str, dict],
                    repeats: int, kept: tuple[str, ...]):
  """Each setting's job (GenerateJob keywords) over `records`, one after another, `repeats`
  times. Returns ({setting: {id: completion ids}} of the last repeat, {setting: [the `kept`
  metrics of each repeat]})."""
  from jaxinfer.requests import Defaults
  from jaxinfer.runner import GenerateJob, run
  outputs, runs = {}, {name: [] for name in settings}
  with tempfile.TemporaryDirectory() as d:
    prompts = Path(d) / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    for repeat in range(repeats):
      for name, kw in settings.items():
        out = Path(d) / f"{name}.jsonl"
        m = run(GenerateJob(prompts=str(prompts), output=str(out), model=str(model_dir),
                            defaults=Defaults(), progress=False, overwrite=True, **kw))
        outputs[name] = {r["id"]: r["completion_ids"]
                         for r in map(json.loads, out.read_text().splitlines())}
        runs[name].append({k: m[k] for k in kept})
        print(repeat, name, json.dumps(runs[name][-1]), file=sys.stderr, flush=True)
  return outputs, runs


def identical(outputs: dict[str, dict], a: str, b: str) -> str:
  """"same/total": the requests whose completions settings a and b agree on."""
  same = sum(outputs[a][i] == outputs[b][i] for i in outputs[a])
  return f"{same}/{len(outputs[a])}"


def median_run(runs: list[dict]) -> dict:
  """The run with the median generation throughput."""
  return sorted(runs, key=lambda r: r["generation_tokens_per_second"])[len(runs) // 2]


def ratios(runs: dict[str, list[dict]], a: str, b: str, key: str) -> list[float]:
  """a's `key` over b's, repeat by repeat."""
  return [round(x[key] / y[key], 2) for x, y in zip(runs[a], runs[b])]
