"""The training loop: learning, checkpoints, and resume after a hard kill."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxinfer.train.loop import read_metrics


def read_scalars(logdir):
  """{tag: {step: value}} from TensorBoard event files, as TensorBoard reads them: files in
  order, later values win, and a session START at step s drops earlier events at steps >= s."""
  import struct

  from tensorboardX.proto import event_pb2
  out = {}
  for f in sorted(Path(logdir).glob("events.out.tfevents.*")):
    data = f.read_bytes()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
        for series in out.values():
          for step in [s for s in series if s >= ev.step]:
            del series[step]
      for v in ev.summary.value:
        out.setdefault(v.tag, {})[ev.step] = v.simple_value
  return out

SCRIPT = Path(__file__).with_name("train_script.py")


def _run(*args):
  env = {**os.environ, "PYTHONPATH": str(SCRIPT.parent.parent)}
  return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                        text=True, env=env, timeout=600)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
  full = _run(tmp_path / "full", tmp_path / "full.npz")
  assert full.returncode == 0, full.stderr
  killed = _run(tmp_path / "crash", tmp_path / "crash.npz", 17)
  assert killed.returncode == -9  # SIGKILL: no chance to save anything at exit
  assert not (tmp_path / "crash.npz").exists()
  steps = sorted(int(p.name) for p in (tmp_path / "crash" / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert steps and max(steps) == 10
  resumed = _run(tmp_path / "crash", tmp_path / "crash.npz")
  assert resumed.returncode == 0, resumed.stderr

  a, b = np.load(tmp_path / "full.npz"), np.load(tmp_path / "crash.npz")
  assert len(a.files) == len(b.files)
  for k in a.files:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6)

  m_full, m_resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "crash")
  assert [m["step"] for m in m_resumed] == [m["step"] for m in m_full] == [5, 10, 15, 20, 25, 30]
  np.testing.assert_allclose([m["loss"] for m in m_resumed], [m["loss"] for m in m_full],
                             rtol=1e-5)
  assert m_full[-1]["loss"] < 0.5 * m_full[0]["loss"]  # it learns the cycle
  # TensorBoard sees the same curve: the crashed run's events past its checkpoint are purged.
  for run, m in (("full", m_full), ("crash", m_resumed)):
    loss = read_scalars(tmp_path / run / "tensorboard")["loss"]
    assert sorted(loss) == [5, 10, 15, 20, 25, 30]
    np.testing.assert_allclose([loss[r["step"]] for r in m], [r["loss"] for r in m], rtol=1e-6)


def test_train_cli_finetunes_and_exports(tmp_path, tiny_model_dir):
  data = tmp_path / "data.jsonl"
  data.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) + "\n"
                          for i in range(200)))
  out = tmp_path / "tuned"
  proc = subprocess.run(
      [sys.executable, "-m", "jaxinfer", "train", f"--model={tiny_model_dir}", f"--data={data}",
       f"--output={out}", "--steps=40", "--batch_size=4", "--seq_len=32", "--learning_rate=3e-3",
       "--checkpoint_every=20", "--cpu_devices=2"],  # (no --mesh: every device on `data`)
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  report = json.loads((out / "report.json").read_text())
  assert report["mesh"] == "data:2,fsdp:1,model:1"
  metrics = read_metrics(str(out) + ".run")
  assert metrics[-1]["loss"] < metrics[0]["loss"]
  assert report["heldout_loss_nats_per_token"] < metrics[0]["loss"]
  assert (out / "tokenizer.json").exists() and (out / "model.safetensors").exists()
  # The workdir now holds a run: the same command again is refused unless told to resume.
  again = subprocess.run(proc.args, capture_output=True, text=True, timeout=600)
  assert again.returncode == 2 and "--resume" in again.stderr and "step 40" in again.stderr
  resumed = subprocess.run(proc.args + ["--resume"], capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr
  assert json.loads((out / "report.json").read_text()) == report
  # resumed with other options, it would no longer be the run it continues: refused, named
  other = subprocess.run(proc.args + ["--resume", "--learning_rate=0.5", "--seed=7"],
                         capture_output=True, text=True, timeout=600)
  assert other.returncode == 2, other.stderr
  assert "started with --learning_rate=0.003, --seed=0" in other.stderr, other.stderr
  # fewer --steps than its checkpoint reached: refused (it wrote step 40's weights as "steps": 20)
  fewer = subprocess.run([a.replace("--steps=40", "--steps=20") for a in proc.args] + ["--resume"],
                         capture_output=True, text=True, timeout=600)
  assert fewer.returncode == 2 and "--steps: " in fewer.stderr, fewer.stderr
  assert "checkpoint at step 40" in fewer.stderr
  # its --data file changed since (its batches would not be the run's): refused, named
  with data.open("a") as f:
    f.write(json.dumps({"text": "def g(y):\n    return y\n"}) + "\n")
  changed = subprocess.run(proc.args + ["--resume"], capture_output=True, text=True, timeout=600)
  assert changed.returncode == 2, changed.stderr
  assert f"error: --data: {data} now gives other tokens" in changed.stderr, changed.stderr


def test_a_resumed_run_keeps_its_steps(tmp_path):
  """The learning-rate schedule spans --steps: resumed with more, a run's later steps followed
  another schedule than its first (an extended 400-step run jumped from 1e-4 back to 9.8e-4)."""
  from jaxinfer.train.workdir import check_workdir, record_settings
  record_settings(tmp_path, {"steps": 3, "learning_rate": 0.1, "progress": True})
  (tmp_path / "checkpoints" / "3").mkdir(parents=True)
  check_workdir(tmp_path, True, {"steps": 3, "learning_rate": 0.1, "progress": False})
  with pytest.raises(ValueError, match="started with --steps=3; this command has --steps=6"):
    check_workdir(tmp_path, True, {"steps": 6, "learning_rate": 0.1, "progress": True})


def test_a_resumed_run_keeps_its_data(tmp_path):
  """A run records the tokens it starts with; resumed on others (the --data file edited), it
  would train on batches an uninterrupted run never saw: refused. A workdir without a run
  forgets them."""
  from jaxinfer.train.workdir import check_data, check_workdir
  tokens = np.arange(100)
  check_data(tmp_path, tokens, "d.txt")
  check_data(tmp_path, tokens.astype(np.int32), "d.txt")  # (the same tokens, in any dtype)
  for other in (tokens[:99], np.r_[tokens[:50], 7, tokens[51:]]):
    with pytest.raises(ValueError, match=r"--data: d.txt now gives other tokens \(\d+\) than "
                                         r"the run in .* started with \(100\)"):
      check_data(tmp_path, other, "d.txt")
  check_workdir(tmp_path, False)  # (no checkpoint, metrics or distilled data: no run)
  check_data(tmp_path, tokens[:99], "d.txt")


def test_training_data_errors_name_the_file_and_line(tmp_path):
  from jaxinfer.train.data import is_jsonl, iter_jsonl
  good = json.dumps({"text": "x"}).encode()
  cases = [(b"\xef\xbb\xbf" + good + b"\n\n" + good + b"\n", None),  # a BOM, a blank line: fine
           (good + b"\n" + b'{"text": "caf\xe9"}\n', "line 2 is not valid UTF-8 \\(byte 14"),
           (good + b"\n{bad\n", "line 2 is not valid JSON"),
           (b'{"txt": "x"}\n', "line 1 has no string 'text' field")]
  for i, (content, error) in enumerate(cases):
    path = tmp_path / f"d{i}.jsonl"
    path.write_bytes(content)
    if error is None:
      assert [n for n, _ in iter_jsonl(path)] == [1, 3]
    else:
      with pytest.raises(ValueError, match=f"--data: {path} {error}"):
        list(iter_jsonl(path))
  upper = tmp_path / "chat.JSONL"  # (was trained on as raw text, its JSON syntax and all)
  upper.write_bytes(good + b"\n")
  assert is_jsonl(upper)


def test_train_cli_refuses_data_too_short_for_one_window(tmp_path, tiny_model_dir):
  data = tmp_path / "short.txt"
  data.write_text("def f(x):\n    return x\n")
  proc = subprocess.run(  # ("~/": the home directory's, as a shell reads it)
      [sys.executable, "-m", "jaxinfer", "train", f"--model={tiny_model_dir}", "--data=~/short.txt",
       "--output=~/out", "--seq_len=64", "--mesh=data:1"],
      capture_output=True, text=True, timeout=300, env={**os.environ, "HOME": str(tmp_path)})
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --data: {data} gives "), proc.stderr
  assert "--seq_len=64" in proc.stderr
  # an output under a file: refused before the model is read (a traceback, or with --workdir
  # after the whole run)
  proc = subprocess.run(
      [sys.executable, "-m", "jaxinfer", "train", f"--model={tiny_model_dir}", f"--data={data}",
       f"--output={data / 'out'}", f"--workdir={tmp_path / 'w'}"],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --output: {data} is a file")
  # a tokenizer whose ids run past the model's vocabulary (it trained on NaN, and exited 0)
  import dataclasses

  from jaxinfer import checkpoint
  from jaxinfer.cli.common import data_tokens
  cfg, _, tok = checkpoint.load_model(str(tiny_model_dir))
  with pytest.raises(ValueError, match="tokenizer.json gives token id .* past the model's vocab"):
    data_tokens(tok, tiny_model_dir, dataclasses.replace(cfg, vocab_size=10), str(data))
  # a run that diverges: one line, nothing written
  text = tmp_path / "text.txt"
  text.write_text(data.read_text() * 40)
  proc = subprocess.run(
      [sys.executable, "-m", "jaxinfer", "train", f"--model={tiny_model_dir}", f"--data={text}",
       f"--output={tmp_path / 'diverged'}", "--seq_len=16", "--batch_size=2", "--steps=3",
       "--warmup_steps=0", "--learning_rate=1e30", "--mesh=data:1"],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
      "error: --learning_rate: training diverged (loss nan"), proc.stderr
  assert not (tmp_path / "diverged").exists()
  # windows past the model's context (it trained, on positions the model has no rotary table for)
  proc = subprocess.run(
      [sys.executable, "-m", "jaxinfer", "train", f"--model={tiny_model_dir}", f"--data={data}",
       f"--output={tmp_path / 'out'}", "--seq_len=100000", "--mesh=data:1"],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
      "error: --seq_len: 100000 is past the model's context"), proc.stderr


def test_learning_rates_warm_up_for_the_steps_asked_and_allow_a_single_step():
  """No warmup: the first step at the peak rate; a one-step run at the peak (its warmup cut to
  end before the last step, where a schedule of no decay steps would not exist)."""
  from jaxinfer.train.loop import TrainConfig, learning_rates
  lr = lambda step, **kw: float(learning_rates(TrainConfig(learning_rate=0.5, **kw))(step))
  assert lr(0, steps=1, warmup_steps=50) == 0.5
  assert lr(0, steps=10, warmup_steps=0) == 0.5 > lr(1, steps=10, warmup_steps=0)
  assert [lr(s, steps=10, warmup_steps=2) for s in range(3)] == [0.0, 0.25, 0.5]
  assert lr(9, steps=10, warmup_steps=2) > lr(10, steps=10, warmup_steps=2) == pytest.approx(0.05)


def test_an_interrupt_between_a_step_and_its_record_keeps_the_record(tmp_path):
  """Ctrl-C after a logged step ran but before its metrics line was written: the checkpoint at
  that step is saved with its line (a rerun starts after it, so the line was lost for good)."""
  import jax.numpy as jnp
  import optax

  from jaxinfer.train.loop import TrainConfig, train
  cfg = TrainConfig(steps=6, learning_rate=0.1, warmup_steps=0, checkpoint_every=100,
                    log_every=2, progress=False, async_checkpoints=False)
  loss = lambda p, frozen, batch, key: (jnp.sum((p["w"] - batch) ** 2), {})
  calls = []

  def evaluate(params, step):
    calls.append(step)
    if calls == [2, 4]:  # the first time step 4's record is being made
      raise KeyboardInterrupt
    return {}

  run = lambda: train(loss, {"w": jnp.zeros(3)}, lambda s: jnp.ones(3), cfg, tmp_path,
                      eval_fn=evaluate, eval_every=2, optimizer=optax.sgd(0.1))
  with pytest.raises(KeyboardInterrupt):
    run()
  assert [m["step"] for m in read_metrics(tmp_path)] == [2, 4] and calls == [2, 4]
  run()
  assert [m["step"] for m in read_metrics(tmp_path)] == [2, 4, 6]


def test_sigterm_saves_the_step_and_exits_as_terminated(tmp_path):
  """SIGTERM (a preempted job) finishes the step, saves it and stops; the command then exits
  143, as a process ended by SIGTERM reports (it exited 130, Ctrl-C's status)."""
  import signal

  import jax.numpy as jnp
  import optax

  from jaxinfer.train.loop import Stopped, TrainConfig, train
  cfg = TrainConfig(steps=6, learning_rate=0.1, warmup_steps=0, checkpoint_every=100,
                    progress=False, async_checkpoints=False)
  loss = lambda p, frozen, batch, key: (jnp.sum((p["w"] - batch) ** 2), {})

  def batch(step):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return jnp.ones(3)

  with pytest.raises(Stopped, match="stopped by SIGTERM at step 3") as stopped:
    train(loss, {"w": jnp.zeros(3)}, batch, cfg, tmp_path, optimizer=optax.sgd(0.1))
  assert stopped.value.signum == signal.SIGTERM
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == [3]
  code = ("import signal, sys; from jaxinfer.cli import _interruptible\n"
          "from jaxinfer.train.loop import Stopped\n"
          "def main(argv): raise Stopped('train: stopped by SIGTERM', signal.SIGTERM)\n"
          "_interruptible(main, [])")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 143 and "interrupted" in proc.stderr, proc.stderr


def test_seconds_per_step_counts_the_steps_since_the_last_record(tmp_path):
  """The last record of a run of 5 steps logged every 2 covers one step (it was divided by 2)."""
  import time

  import jax.numpy as jnp
  import optax

  from jaxinfer.train.loop import TrainConfig, train
  cfg = TrainConfig(steps=5, learning_rate=0.1, warmup_steps=0, checkpoint_every=100,
                    log_every=2, progress=False, async_checkpoints=False)
  loss = lambda p, frozen, batch, key: (jnp.sum((p["w"] - batch) ** 2), {})

  def batch(step):
    time.sleep(0.1)
    return jnp.ones(3)

  _, logged = train(loss, {"w": jnp.zeros(3)}, batch, cfg, tmp_path, optimizer=optax.sgd(0.1))
  assert [r["step"] for r in logged] == [2, 4, 5]
  assert all(r["seconds_per_step"] >= 0.1 for r in logged), logged


def test_ctrl_c_finishes_the_step_and_checkpoints_it(tmp_path):
  """Ctrl-C as a step is fed (raised there, it once landed mid-step as often as not, the state
  handed to the step: no checkpoint at exit, a rerun started over): the step runs, is
  checkpointed, and the run stops; the rerun goes on from it."""
  import signal

  import jax.numpy as jnp
  import optax
  import orbax.checkpoint as ocp

  from jaxinfer.train.loop import TrainConfig, train
  cfg = TrainConfig(steps=8, learning_rate=0.1, warmup_steps=0, checkpoint_every=100,
                    log_every=100, progress=False, async_checkpoints=False)
  loss = lambda p, frozen, batch, key: (jnp.sum((p["w"] - batch) ** 2), {})

  sent = []

  def batch(step):
    if step == 4 and not sent:
      sent.append(step)
      signal.raise_signal(signal.SIGINT)
    return jnp.ones(3)

  run = lambda: train(loss, {"w": jnp.zeros(3)}, batch, cfg, tmp_path, optimizer=optax.sgd(0.1))
  # as a foreground process has it (a background one, the tests' too maybe, ignores SIGINT)
  callers = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.raises(KeyboardInterrupt, match="stopped by SIGINT at step 5"):
      run()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # (the caller's again)
  finally:
    signal.signal(signal.SIGINT, callers)
  assert ocp.CheckpointManager(tmp_path / "checkpoints").latest_step() == 5
  run()
  assert ocp.CheckpointManager(tmp_path / "checkpoints").latest_step() == 8


def test_a_resumed_run_keeps_whether_it_reads_a_hidden_state_cache(tmp_path):
  """Where the cache lies may change on resume; whether there is one may not (its batches come
  in another order than random windows'). A run recorded before the key existed resumes."""
  from jaxinfer.train.workdir import check_workdir, record_settings
  work = tmp_path / "run"
  settings = {"lr": 1e-3, "hidden_cache": None}
  record_settings(work, settings)
  (work / "metrics.jsonl").write_text("{}\n")  # (a run under way)
  check_workdir(work, True, settings)
  check_workdir(work, True, {**settings, "workdir": "elsewhere"})
  with pytest.raises(ValueError, match="--hidden_cache"):
    check_workdir(work, True, {**settings, "hidden_cache": "cache/"})
  cached = tmp_path / "cached"
  record_settings(cached, {**settings, "hidden_cache": "cache/"})
  (cached / "metrics.jsonl").write_text("{}\n")
  check_workdir(cached, True, {**settings, "hidden_cache": "moved/cache/"})
  with pytest.raises(ValueError, match="--hidden_cache"):
    check_workdir(cached, True, settings)
