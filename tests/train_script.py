"""A tiny training run for the resume tests: `python train_script.py WORKDIR OUT.npz [KILL_AT]`.

With KILL_AT, the process SIGKILLs itself when asked for that step's batch (a hard crash)."""

import os
import signal
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxinfer import model as M  # noqa: E402
from jaxinfer.config import PRESETS  # noqa: E402
from jaxinfer.train.lm import TokenWindows, lm_loss_fn  # noqa: E402
from jaxinfer.train.loop import TrainConfig, train  # noqa: E402


def main(workdir, out, kill_at=None):
  cfg = PRESETS["tiny"]
  tokens = np.tile(np.arange(50, dtype=np.int32), 40)  # a learnable cycle
  windows = TokenWindows(tokens, batch_size=4, seq_len=32, seed=3)

  def batch_fn(step):
    if kill_at is not None and step == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
    return windows(step)

  params = M.init_params(cfg, jax.random.key(0))
  tcfg = TrainConfig(steps=30, learning_rate=1e-2, warmup_steps=5, checkpoint_every=10,
                     log_every=5, progress=False)
  params, _ = train(lm_loss_fn(cfg), params, batch_fn, tcfg, workdir)
  leaves = jax.tree_util.tree_leaves(params)
  np.savez(out, *[np.asarray(x) for x in leaves])


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
