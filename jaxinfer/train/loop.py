"""A small, resumable training loop shared by pretraining, fine-tuning, draft heads and QAT.

The caller supplies a pure `loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)` and a
deterministic `batch_fn(step) -> batch`. Because the batch is a function of the step alone, a run
resumed from its last orbax checkpoint sees exactly the data an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxinfer.files import write_atomically
from jaxinfer.sharding import DEFAULT_RULES, ShardingRules

LossFn = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000
  learning_rate: float = 3e-3
  min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
  warmup_steps: int = 100
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  b2: float = 0.95
  checkpoint_every: int = 200
  keep_checkpoints: int = 2
  # Synchronous saves make a checkpoint durable before training continues; async overlaps the
  # write with the next steps (worth it for large models) at the risk of losing the newest one.
  async_checkpoints: bool = False
  log_every: int = 10
  seed: int = 0
  progress: bool = True

  def __post_init__(self):
    if self.steps < 1:
      raise ValueError(f"TrainConfig: steps must be >= 1, got {self.steps}")
    if self.checkpoint_every < 1 or self.log_every < 1:
      raise ValueError("TrainConfig: checkpoint_every and log_every must be >= 1")
    if not self.learning_rate > 0:
      raise ValueError(f"TrainConfig: learning_rate must be > 0, got {self.learning_rate}")


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def learning_rates(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0 over `warmup_steps` (0: step 0 at the peak), then cosine decay to
  `min_lr_ratio` of it by the last step; the warmup ends a step before the last at the latest."""
  return optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, min(cfg.warmup_steps, cfg.steps - 1), cfg.steps,
      cfg.learning_rate * cfg.min_lr_ratio)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  schedule = learning_rates(cfg)
  decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(schedule, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask))


class MetricsWriter:
  """Appends one JSON object per line; on resume drops lines past the restored step. Also
  writes every numeric metric as a TensorBoard scalar under <dir>/tensorboard (`tensorboard
  --logdir`); a resumed run purges the events past the restored step."""

  def __init__(self, path: Path, resume_step: int):
    from tensorboardX import SummaryWriter
    self.path = path
    path.parent.mkdir(parents=True, exist_ok=True)
    # TensorBoard drops earlier events at steps >= purge_step: those past the restored step.
    self._tb = SummaryWriter(str(path.parent / "tensorboard"),
                             purge_step=resume_step + 1 if resume_step > 0 else None)
    kept, steps = [], set()
    if path.exists() and resume_step > 0:
      for line in path.read_text().splitlines():
        try:
          step = json.loads(line).get("step", 0)
        except json.JSONDecodeError:
          break  # a torn last line from a crash
        if step <= resume_step and step not in steps:  # (an interrupt can write one twice)
          kept.append(line)
          steps.add(step)
    write_atomically(path, "".join(l + "\n" for l in kept))  # (a crash here loses none)
    self._f = open(path, "a")

  def write(self, record: dict[str, Any]) -> None:
    self._f.write(json.dumps(record) + "\n")
    self._f.flush()
    step = int(record.get("step", 0))
    for k, v in record.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self) -> None:
    self._f.close()
    self._tb.close()


def _to_float(metrics: dict[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _step_fn(loss_fn: LossFn, optimizer: optax.GradientTransformation, seed: int):
  """One optimizer step: (state, frozen, batch) -> (state, metrics)."""

  def step_fn(state: TrainState, frozen, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen,
                                                                       batch, rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step_fn


def _batch_placer(mesh: Mesh | None, rules: ShardingRules):
  """A batch's leading axis sharded over the mesh's batch axes (as is without a mesh)."""

  def put(batch):
    if mesh is None or mesh.size == 1:
      return batch
    return jax.tree_util.tree_map(
        lambda x: jax.device_put(x, rules.sharding(mesh, ("batch",) + (None,) * (x.ndim - 1),
                                                   x.shape)), batch)

  return put


class Stopped(KeyboardInterrupt):
  """Training stopped by a signal (`signum`: SIGTERM or SIGINT) once its step was saved."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum


def train(loss_fn: LossFn, params: Any, batch_fn: Callable[[int], Any], cfg: TrainConfig,
          workdir: str | os.PathLike, frozen: Any = None,
          eval_fn: Callable[[Any, int], dict[str, float]] | None = None,
          eval_every: int | None = None,
          optimizer: optax.GradientTransformation | None = None,
          mesh: Mesh | None = None, rules: ShardingRules = DEFAULT_RULES,
          description: str = "train") -> tuple[Any, list[dict[str, float]]]:
  """Trains `params` for cfg.steps steps, checkpointing to `workdir`; resumes if a checkpoint
  exists there. Returns the final params and the logged metrics of this invocation.

  With a mesh, each batch's leading axis is sharded over the mesh's batch axes (params keep the
  shardings they arrive with; optimizer state follows them)."""
  workdir = Path(workdir).absolute()
  optimizer = optimizer or make_optimizer(cfg)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=jax.jit(optimizer.init)(params))
  manager = ocp.CheckpointManager(
      workdir / "checkpoints",
      options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True,
                                           enable_async_checkpointing=cfg.async_checkpoints))
  start = 0
  if manager.latest_step() is not None:
    start = manager.latest_step()
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
    state = manager.restore(start, args=ocp.args.StandardRestore(abstract))
  writer = MetricsWriter(workdir / "metrics.jsonl", start)
  step_jit = jax.jit(_step_fn(loss_fn, optimizer, cfg.seed), donate_argnums=(0,))
  put = _batch_placer(mesh, rules)

  # SIGTERM (a preempted job) or Ctrl-C finishes the step, checkpoints it and stops (raised
  # mid-step, an interrupt found the state handed to the step: nothing was left to save); a
  # second Ctrl-C is the caller's, at once
  interrupted: list[signal.Signals] = []
  previous = {}

  def on_signal(signum, frame):
    if interrupted and signum == signal.SIGINT:
      handler = previous[signal.SIGINT]
      if callable(handler):
        handler(signum, frame)
      raise KeyboardInterrupt
    interrupted.append(signal.Signals(signum))

  try:
    for sig in (signal.SIGTERM, signal.SIGINT):
      if signal.getsignal(sig) is not signal.SIG_IGN:  # (a background job ignores Ctrl-C)
        previous[sig] = signal.signal(sig, on_signal)
  except ValueError:  # not the main thread: leave signals alone
    previous = {}
  logged: list[dict[str, float]] = []
  bar = tqdm(total=cfg.steps, initial=start, desc=description, disable=not cfg.progress,
             dynamic_ncols=True)
  t_last, step, step_last = time.perf_counter(), start, start
  unlogged = None  # (step, metrics) of a step done whose record is not written yet

  def log(done: int, metrics, evaluate: bool = True) -> None:
    nonlocal t_last, step_last, unlogged
    record = {"step": done, **_to_float(metrics)}
    # (over the steps since the last record: fewer than log_every at the end or after a resume)
    record["seconds_per_step"] = (time.perf_counter() - t_last) / max(done - step_last, 1)
    t_last, step_last = time.perf_counter(), done
    if (evaluate and eval_fn is not None and eval_every
        and (done % eval_every == 0 or done == cfg.steps)):
      record.update(eval_fn(state.params, done))
    writer.write(record)
    logged.append(record)
    unlogged = None
    bar.set_postfix(loss=f"{record['loss']:.3f}")

  try:
    for step in range(start, cfg.steps):
      state, metrics = step_jit(state, frozen, put(batch_fn(step)))
      done = step + 1
      if done % cfg.log_every == 0 or done == cfg.steps:
        unlogged = (done, metrics)
        log(done, metrics)
      bar.update(1)
      if done % cfg.checkpoint_every == 0 or done == cfg.steps or interrupted:
        manager.save(done, args=ocp.args.StandardSave(state))
      if interrupted:
        manager.wait_until_finished()
        raise Stopped(f"{description}: stopped by {interrupted[0].name} at step {done}; "
                      f"rerun to resume", interrupted[0])
  except KeyboardInterrupt:
    manager.wait_until_finished()
    try:
      if manager.latest_step() != int(state.step):
        manager.save(int(state.step), args=ocp.args.StandardSave(state), force=True)
        manager.wait_until_finished()
      if (unlogged is not None and unlogged[0] == int(state.step)  # (a rerun starting after
          and not (logged and logged[-1]["step"] == unlogged[0])):  # it would never write it;
        log(*unlogged, evaluate=False)  # its evaluation is what the interrupt stopped)
    except RuntimeError:
      pass  # interrupted mid-step (state donated): the last periodic checkpoint stands
    raise
  finally:
    bar.close()
    writer.close()
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  manager.wait_until_finished()
  manager.close()
  return state.params, logged


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  path = Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
