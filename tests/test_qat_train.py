"""QAT fine-tuning (`jaxinfer train --qat`): it trains through the fake-quantized forward, its
served checkpoint computes the QAT forward of the final weights bit for bit, and it resumes
after a crash like any training run."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import TINY_TEXT, make_tiny_model_dir

from jaxinfer import model as M
from jaxinfer import quant
from jaxinfer.checkpoint import load_model
from jaxinfer.config import PRESETS
from jaxinfer.train import qat
from jaxinfer.train.lm import TokenWindows, lm_loss_fn, next_token_logits
from jaxinfer.train.loop import TrainConfig, TrainState, make_optimizer, read_metrics, train

CFG = dataclasses.replace(PRESETS["tiny"], head_dim=32)  # groups of 32 divide every contraction
INT4 = quant.QuantFormat.parse("int4:g32")
WINDOWS = TokenWindows(np.tile(np.arange(50, dtype=np.int32), 40), 4, 32, seed=3)  # a cycle


def _tcfg(**kw):
  return TrainConfig(**{"steps": 8, "learning_rate": 1e-2, "warmup_steps": 2,
                        "checkpoint_every": 4, "log_every": 1, "progress": False, **kw})


def _start():
  return M.init_params(CFG, jax.random.key(0))  # fresh buffers: training donates them


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_qat_learns_and_differs_from_plain_training(tmp_path):
  """Weight-only and with int8 activations (the served forward, straight-through gradients)."""
  _, plain = train(lm_loss_fn(CFG), _start(), WINDOWS, _tcfg(), tmp_path / "plain")
  plain_loss = np.array([r["loss"] for r in plain])
  for fmt in (INT4, quant.QuantFormat.parse("int8:a8")):
    _, logged = qat.finetune(CFG, _start(), WINDOWS, _tcfg(), tmp_path / fmt.name, fmt)
    loss = np.array([r["loss"] for r in logged])
    assert np.isfinite(loss).all() and loss[-1] < loss[0], fmt
    assert loss[0] != plain_loss[0] and not np.allclose(loss, plain_loss)


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path):
  """Distillation too: the teacher (the starting weights) is rebuilt the same on resume."""

  def run(workdir, crash_at=None):
    def batch_fn(step):
      if step == crash_at:
        raise RuntimeError("crash")  # dies without saving: the periodic checkpoint stands
      return WINDOWS(step)
    return qat.finetune(CFG, _start(), batch_fn, _tcfg(checkpoint_every=3), workdir, INT4,
                        distill=True)[0]

  full = run(tmp_path / "full")
  with pytest.raises(RuntimeError, match="crash"):
    run(tmp_path / "crash", crash_at=5)
  saved = [int(p.name) for p in (tmp_path / "crash" / "checkpoints").iterdir() if p.name.isdigit()]
  assert max(saved) == 3
  resumed = run(tmp_path / "crash")
  for a, b in zip(_leaves(full), _leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  m_full, m_resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "crash")
  assert [m["step"] for m in m_resumed] == [m["step"] for m in m_full] == list(range(1, 9))
  assert [m["loss"] for m in m_resumed] == [m["loss"] for m in m_full]
  kl = np.array([m["loss"] for m in m_full])
  assert np.isfinite(kl).all() and (kl >= 0).all() and kl[0] > 0  # int4 moved the logits
  assert all(np.isfinite(m["next_token_loss"]) for m in m_full)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return make_tiny_model_dir(tmp_path_factory.mktemp("qat_model"), head_dim=32)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "jaxinfer", *map(str, args)],
                        capture_output=True, text=True, timeout=300)


def test_cli_serves_the_qat_forward_of_the_final_weights(tmp_path, model_dir):
  data = tmp_path / "data.txt"
  data.write_text(TINY_TEXT * 8)
  out = tmp_path / "q"
  proc = _cli("train", f"--model={model_dir}", f"--data={data}", f"--output={out}",
              "--qat=int4:g32", "--steps=6", "--batch_size=2", "--seq_len=16",
              "--warmup_steps=2", "--checkpoint_every=3", "--mesh=data:1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "int4:g32 quantized checkpoint" in proc.stdout
  cfg, served, tok = load_model(str(out))
  assert quant.read_metadata(out) == INT4 and tok is not None
  assert quant.is_quantized(served.layers[0].attn.o)

  # The final full-precision weights, from the run's last checkpoint.
  _, start, _ = load_model(str(model_dir))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=start,
                     opt_state=jax.jit(make_optimizer(_tcfg()).init)(start))
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
  with ocp.CheckpointManager(Path(f"{out}.run") / "checkpoints") as manager:
    assert manager.latest_step() == 6
    final = manager.restore(6, args=ocp.args.StandardRestore(abstract)).params
  assert any((a != b).any() for a, b in zip(_leaves(start), _leaves(final)))  # it trained

  tokens = jnp.asarray(WINDOWS(0) % cfg.vocab_size)
  spec = M.Transformer.spec(cfg)
  run = jax.jit(lambda p: next_token_logits(p, tokens, cfg))
  assert cfg.dtype == "float32"
  np.testing.assert_array_equal(np.asarray(run(served)),
                                np.asarray(run(quant.qat_params(final, spec, INT4))))


@pytest.mark.parametrize("fmt,needle", [("int3", "--qat: quantization format 'int3': unknown"),
                                        ("int4:g64", "--qat: .* groups of 64 do not divide head_dim")])
def test_cli_bad_format_is_one_line(tmp_path, model_dir, fmt, needle):
  data = tmp_path / "data.txt"
  data.write_text(TINY_TEXT)
  proc = _cli("train", f"--model={model_dir}", f"--data={data}", f"--output={tmp_path / 'q'}",
              f"--qat={fmt}", "--steps=2")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and re.search(needle, lines[0]), proc.stderr[-3000:]
