"""Which draft tree the engine verifies, chosen per dispatch from measured speed.

The ladder is the proposer's tree, ever smaller ones (`Proposer.shrink`) and, last, plain
decoding (which the engine runs with its plain steps). Policy "always" verifies the proposer's
own tree every step; "auto" runs the level with the most output tokens per second, re-trying
the slower ones now and then (less often the more they lost by), so that a change of load (a
fuller batch, prompts that repeat less) is noticed at a bounded cost.

A level's speed is its tokens per verification (tau) over its step time. The step time is
measured per level over the dispatches that ran it (decode-only ones, not compiling: wall time
between the host's reads); it depends on the tree's shape, not on the text. Tau depends on the
text, which changes from prompt to prompt, so it is not each level's own average over whatever
prompts it happened to run on: every tree dispatch updates one recent estimate of how often a
draft is accepted at each depth, given the one before it was, and each level's tau follows from
the depths it drafts (1 + the sum over its depths of the chance that all drafts up to there are
accepted). For chains this is exact; a smaller tree is assumed to keep the larger one's best
branches.

Exploring a tree compiles its steps, which on a short job costs more than speculation can win
back. Plain decoding is measured first; a tree not compiled yet is tried only once the work in
sight (the caller's estimate: what is left of the job, or what this policy's engine has decoded
so far, whichever is larger) is at least AMORTIZE times what compiling it is expected to cost
(the most a tree compiled already took, and at least TREE_COMPILE times plain decoding's
compilation) and what the trees tried so far cost, so a job that ends right after paying for
them has lost at most about 1 / AMORTIZE of its time. The work left is its requests' budgets
scaled by the share of their budgets that the requests finished so far used (requests ending at
EOS long before their budgets leave less work than the budgets say)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxinfer.speculative.proposers.common import root_only
from jaxinfer.speculative.protocol import Draft, Proposer

POLICIES = ("auto", "always")


@dataclasses.dataclass(frozen=True)
class Plain(Proposer):
  """Plain decoding as a level of the ladder: the one-token tree (the root alone), which the
  engine runs as its plain steps (a draft layer in its pages fed by them); as a proposer, the
  proposer's state passing through."""

  name: str = "plain"

  @property
  def tree_size(self) -> int:
    return 1

  @property
  def max_depth(self) -> int:
    return 0

  def draft(self, weights, state, ctx):
    return state, Draft(root_only(ctx)[:, None], jnp.asarray([-1], jnp.int32), None)


def ladder(proposer: Proposer, policy: str, max_shrinks: int = 3) -> list[Proposer]:
  """The levels a policy picks among: the proposer first; with "auto", its smaller trees and
  plain decoding (`Plain`, the engine's plain steps)."""
  if policy not in POLICIES:
    raise ValueError(f"speculation policy: expected one of {POLICIES}, got {policy!r}")
  levels = [proposer]
  while policy == "auto" and len(levels) <= max_shrinks:
    smaller = levels[-1].shrink()
    if smaller is None or smaller.tree_size >= levels[-1].tree_size:
      break
    levels.append(smaller)
  if policy != "auto":
    return levels
  return levels + [Plain()]


DECAY = 0.8  # weight of the past in the decayed sums below
# (the sums are Python floats: the policy runs on the host between every two dispatches, where
# numpy's per-call cost on arrays this small would be most of its time)


class _Acceptance:
  """Decayed counts, per draft depth d, of verified rows whose tree reached depth d with its
  first d - 1 drafts accepted (`tried`), and of those that accepted the d-th too (`accepted`)."""

  def __init__(self, max_depth: int):
    self.tried = [0.0] * (max_depth + 1)
    self.accepted = [0.0] * (max_depth + 1)

  def record(self, depth: int, hist) -> None:
    """hist[a]: verified rows that accepted a drafts, of a tree `depth` deep."""
    reached = np.cumsum(np.asarray(hist)[::-1])[::-1].tolist()  # rows accepting a or more
    for d in range(1, len(self.tried)):
      self.tried[d] *= DECAY
      self.accepted[d] *= DECAY
      if d <= depth:
        self.tried[d] += reached[d - 1]
        self.accepted[d] += reached[d]

  def tau(self, depth: int) -> float | None:
    """Expected tokens per verification of a tree `depth` deep (None: a depth never tried)."""
    if depth and not self.tried[depth]:
      return None
    tau = chance = 1.0
    for d in range(1, depth + 1):
      chance *= self.accepted[d] / max(self.tried[d], 1e-9)
      tau += chance
    return tau


class _Meter:
  """Decayed sums of what dispatches of one kind measured, per ladder level: output tokens,
  verifications of live rows, steps, seconds."""

  def __init__(self, n: int):
    self.sums = [[0.0] * 4 for _ in range(n)]
    self.measured = [0] * n

  def record(self, level: int, tokens: int, row_steps: int, steps: int, seconds: float):
    self.sums[level] = [DECAY * old + new for old, new in zip(
        self.sums[level], (tokens, row_steps, steps, max(seconds, 1e-9)))]
    self.measured[level] += 1

  def tau(self, level: int) -> float:
    """Tokens per verification of a live row."""
    tokens, rows = self.sums[level][:2]
    return tokens / max(rows, 1e-9)

  def step_s(self, level: int) -> float:
    """Seconds per step (a step computes every slot, live or not)."""
    _, _, steps, seconds = self.sums[level]
    return seconds / max(steps, 1e-9)

  def rate(self, level: int, tau: float | None = None) -> float | None:
    """Tokens per live row per second: tau (`tau`, or the level's own) over the step time,
    which does not depend on how many rows were live when it was measured."""
    if not self.measured[level]:
      return None
    return (self.tau(level) if tau is None else tau) / self.step_s(level)


class TreePolicy:
  """Per dispatch: the ladder level to run (`pick`); `record` what a dispatch measured.

  Speeds are tokens per live row per second (tau over the step time), so levels measured with
  different numbers of live rows compare; tau comes from the recent acceptance by depth shared by
  every level (see the module's description). Decode-only dispatches run the fastest level. A mixed
  dispatch (prompt lanes beside the trees) spends time on its lanes whatever the tree, so it
  runs, of the fastest decode level and plain decoding, the one whose tokens save the most
  decode-only time for what its step costs: highest live rows x tau / fastest rate - step
  seconds."""

  MEASURED = 2  # dispatches a level needs before its speed is trusted
  # A level picked after another runs this many dispatches in a row: the host times a dispatch
  # as the wall time between two reads, which is that dispatch's alone only when the one before
  # it ran the same tree (the device runs one dispatch while the host reads the last)
  HOLD = 3
  # A tree is picked over plain decoding only when measured this much faster: its dispatches'
  # times leave out what trees cost beside their steps (a switch to or from plain decoding
  # waits for every dispatch in flight; a row's end is learnt a dispatch late)
  TREE_MARGIN = 0.1
  # A level takes over from the fastest only when this much faster than it: speeds measured
  # over changing prompts wander, and every switch between trees and plain decoding costs a wait
  SWITCH_MARGIN = 0.1
  # A tree is compiled to be tried only when the work in sight is this many times its expected
  # compilation (module description); until plain decoding's is known, a tree's is expected
  # to be TREE_COMPILE times it (a decode loop and a mixed step of trees against plain ones)
  AMORTIZE = 20
  TREE_COMPILE = 3

  def __init__(self, levels: list[Proposer], policy: str, explore_every: int = 16):
    self.sizes = [p.tree_size for p in levels]
    self.depths = [p.max_depth for p in levels]
    self.acceptance = _Acceptance(max(self.depths))
    self.policy, self.explore_every = policy, explore_every
    n = len(levels)
    self.decode, self.mixed = _Meter(n), _Meter(n)
    self.dispatches = [0] * n  # per level since `start_call` (the engine counts its dispatches)
    self.last = {False: [0] * n, True: [0] * n}  # (mixed?) -> the clock a level last ran at
    self.clock = 0
    self.current = {False: None, True: None}  # (mixed?) -> the level held
    self.hold = {False: 0, True: 0}  # (mixed?) -> dispatches it is held for still
    self.best = {False: None, True: None}  # (mixed?) -> the fastest when last picked
    # (mixed?) -> per level, how many times longer than at first its re-tries are apart: each
    # re-try that confirms the level slower doubles it; a new fastest level resets them all
    self.backoff = {False: [1] * n, True: [1] * n}
    # per level, since `start_call`: output tokens and live-row seconds (each timed decode-only
    # dispatch's seconds times its live rows) of the timed decode-only dispatches
    self.call = np.zeros((n, 2))
    self._live = [1.0] * n  # per level, the live rows of its last dispatch that ran a step
    self.compile_s = [0.0] * n  # per level, the compilation its dispatches caused (`compiled`)
    self.deferred: tuple[float, float] | None = None  # (compile, work) seconds a tree waits on
    self.held = False  # the last pick was held to plain decoding by its caller (`pick`)

  @property
  def measured(self) -> list[int]:
    return self.decode.measured

  def tau(self, level: int, meter: _Meter | None = None) -> float:
    """A level's expected tokens per verification now: from the shared acceptance by depth,
    else (a depth no dispatch has drafted yet) from its own dispatches' (`meter`'s)."""
    tau = self.acceptance.tau(self.depths[level])
    return (meter or self.decode).tau(level) if tau is None else tau

  def tps(self, level: int) -> float | None:
    """A level's tokens per live row per second in decode-only dispatches: its expected tau
    now over its measured step time."""
    return self.decode.rate(level, self.tau(level))

  def _speeds(self) -> dict[int, float]:
    """`tps` of every level measured, a tree's less TREE_MARGIN."""
    plain = len(self.sizes) - 1
    return {i: self.tps(i) * (1 if i == plain else 1 - self.TREE_MARGIN)
            for i in range(len(self.sizes)) if self.measured[i]}

  def record(self, level: int, tokens: int, row_steps: int, steps: int, seconds: float | None,
             mixed: bool = False, accepted: np.ndarray | None = None) -> None:
    """What a dispatch of `level` did: `tokens` emitted by `row_steps` verifications of live
    rows in `steps` steps, in `seconds` (None: not timed alone; only its acceptance counts),
    `accepted[a]` of the verifications accepting a drafts."""
    if accepted is not None and self.depths[level]:
      self.acceptance.record(self.depths[level], accepted)
    if seconds is None:
      return
    (self.mixed if mixed else self.decode).record(level, tokens, row_steps, steps, seconds)
    if not mixed:
      if steps:
        self._live[level] = row_steps / steps
      self.call[level] += (tokens, seconds * self._live[level])

  def compiled(self, level: int, seconds: float) -> None:
    """A dispatch of `level` compiled for `seconds` (its steps, or rows turning to trees)."""
    self.compile_s[level] += seconds

  def _affordable(self, level: int, work_s: float | None) -> bool:
    """Whether to try `level` now: compiled already, or `work_s`, the work in sight, pays for
    compiling it (module description; None: always)."""
    if work_s is None or self.compile_s[level]:
      return True
    plain = len(self.sizes) - 1
    trees = [c for c in self.compile_s[:plain] if c]
    expected = max(trees + [self.TREE_COMPILE * self.compile_s[plain]])
    # what the trees tried so far cost counts too: each tree paying for itself alone, a ladder
    # of them could spend AMORTIZE times less than the work in sight several times over
    if work_s >= self.AMORTIZE * (sum(trees) + expected):
      return True
    self.deferred = (expected, work_s)
    return False

  def wants_trees(self, work_s: float | None) -> bool:
    """Whether a tree would be tried now: one is compiled already, or the next level to explore
    is a tree (plain decoding measured first, then a tree only once the work in sight pays for
    compiling it: `_exploring`)."""
    plain = len(self.sizes) - 1
    if self.policy == "always" or any(self.compile_s[:plain]):
      return True
    return self._exploring(work_s) not in (None, plain)

  def start_call(self) -> None:
    """Starts counting what `summary` reports as one call's (`dispatches`, `call`)."""
    self.dispatches = [0] * len(self.sizes)
    self.call[:] = 0

  def _exploring(self, work_s: float | None) -> int | None:
    """The level still to measure: plain decoding, the proposer's tree, then ever smaller trees
    while the smallest measured loses to plain decoding or beat the one before it; a tree only
    when `_affordable`."""
    plain = len(self.sizes) - 1
    if self.measured[plain] < self.MEASURED:
      return plain
    if self.measured[0] < self.MEASURED:
      return 0 if self._affordable(0, work_s) else None
    deepest = max(i for i in range(plain) if self.measured[i] >= self.MEASURED)
    if deepest + 1 < plain and (deepest == 0 or self.tps(deepest) < self.tps(plain)
                                or self.tps(deepest) > self.tps(deepest - 1)):
      return deepest + 1 if self._affordable(deepest + 1, work_s) else None
    return None

  def pick(self, mixed: bool = False, live: int = 1, work_s: float | None = None,
           hold_trees: bool = False) -> int:
    """The level of the next dispatch (`mixed`: it has prompt lanes; `live`: rows it verifies;
    `work_s`: the work in sight, in seconds, that compiling a tree must pay for; None: any;
    `hold_trees`: the caller cannot run trees yet, plain decoding it is)."""
    self.clock += 1
    self.held = hold_trees and self.policy != "always"
    if self.policy == "always":
      level = 0
    elif self.held:
      level = len(self.sizes) - 1
    elif self.hold[mixed] > 0:
      level = self.current[mixed]
      self.hold[mixed] -= 1
    else:
      level = self._pick_mixed(live) if mixed else self._pick(work_s)
      if level != self.current[mixed]:
        self.current[mixed], self.hold[mixed] = level, self.HOLD - 1
    self.last[mixed][level] = self.clock
    return level

  def _pick(self, work_s: float | None) -> int:
    explore = self._exploring(work_s)
    if explore is not None:
      return explore
    speeds = self._speeds()
    best, held = max(speeds, key=speeds.get), self.best[False]
    if held in speeds and speeds[best] < (1 + self.SWITCH_MARGIN) * speeds[held]:
      best = held
    return self._or_overdue(best, speeds, False)

  def _pick_mixed(self, live: int) -> int:
    plain = len(self.sizes) - 1
    speeds = self._speeds()
    fastest = self.best[False] if self.best[False] in speeds else (
        max(speeds, key=speeds.get) if speeds else plain)
    for level in (fastest, plain):
      if self.mixed.measured[level] < self.MEASURED:
        return level
    m = self.mixed

    def value(i):  # decode-only seconds its tokens save, less its own step's
      if not speeds:
        return m.rate(i, self.tau(i, m))
      return live * self.tau(i, m) / speeds[fastest] - m.step_s(i)
    values = {i: value(i) for i in {fastest, plain}}
    best = max(values, key=values.get)
    # (values are not speeds: the other is re-tried as a level at half the speed would be)
    return self._or_overdue(best, {i: 1.0 for i in values} | {best: 2.0}, True)

  def _or_overdue(self, best: int, speeds: dict[int, float], mixed: bool) -> int:
    """`best`, or the most overdue slower level: one is re-tried (for `hold` dispatches) every
    explore_every * hold * (its speed ratio to the fastest)^2 dispatches (at most 256 apart),
    times its backoff (at most 8)."""
    last, backoff, held = self.last[mixed], self.backoff[mixed], self.current[mixed]
    if best != self.best[mixed]:
      self.best[mixed] = best
      backoff[:] = [1] * len(backoff)
    elif held is not None and held != best:  # a re-try that lost
      backoff[held] = min(8, 2 * backoff[held])
    apart = lambda i: min(256, self.explore_every * self.HOLD * (
        speeds[best] / max(speeds[i], 1e-9))**2)
    overdue = {i: (self.clock - last[i]) / (backoff[i] * apart(i)) for i in speeds if i != best}
    late = max(overdue, key=overdue.get, default=None)
    return late if late is not None and overdue[late] >= 1 else best

  def size_tps(self, size: int, rows: int) -> float | None:
    """The measured tokens/s of the ladder's tree of `size` tokens with `rows` live rows (None:
    not measured)."""
    tps = self.tps(self.sizes.index(size))
    return None if tps is None else round(rows * tps, 1)

  def summary(self, counts: list[int], call: np.ndarray | None = None) -> str:
    """What was decoded with `counts` dispatches per ladder level (this policy's, or several
    replicas' summed), in words, with this policy's measured speeds and what the call's timed
    decode-only dispatches measured (`call`: as this policy's `call`, or several summed)."""
    total = sum(counts)
    if not total:
      return "nothing decoded"
    if self.policy == "always":
      return f"speculating throughout with {self.sizes[0]}-token trees"
    plain = len(self.sizes) - 1
    spec = 1 - counts[plain] / total
    if spec == 0 and not any(self.measured[:plain]):
      why = "plain decoding, measured first, was not measured yet"
      if self.held:
        why = ("they wait for the rows that began before the draft layer was fed to end "
               "(its context of them is missing)")
      elif self.deferred:
        why = (f"compiling them (about {self.deferred[0]:.1f} s) would cost more than "
               f"1/{self.AMORTIZE} of the work in sight ({self.deferred[1]:.1f} s)")
      return (f"decoded plainly throughout: trees not tried yet, {why}; "
              f"speculation='always' speculates from the start")
    if spec == 0:
      return "decoded plainly throughout"
    best = max(range(plain), key=lambda i: counts[i])
    speeds = ", ".join(f"{self.sizes[i]}: {self.tps(i):.1f}" for i in range(len(self.sizes))
                       if self.measured[i])
    call = self.call if call is None else call
    trees, plain_sums = call[:plain].sum(axis=0), call[plain]
    if trees.all() and plain_sums.all():  # (tokens and seconds of each: 0 gave "inf" or 0.00)
      ratio = (trees[0] / trees[1]) / (plain_sums[0] / plain_sums[1])
      versus = (f"; this call's decode-only dispatches speculated at {ratio:.2f}x plain "
                f"decoding's tokens per live row per second")
    else:
      versus = ("; this call timed too few decode-only dispatches of "
                f"{'trees' if not trees.all() else 'plain decoding'} to compare")
    return (f"speculating in {spec:.0%} of dispatches, mostly with {self.sizes[best]}-token "
            f"trees (measured tokens/s per live row by tree size: {speeds}){versus}")


def policy_metrics(policies: list[TreePolicy], rows: int) -> dict:
  """The speculative metrics of the call since `start_call` (`metrics.SPECULATIVE_KEYS`' policy
  part) of replicas' policies over one ladder: dispatches summed, speeds from the policy that
  measured most, tokens/s given for `rows` live rows."""
  counts = np.sum([p.dispatches for p in policies], axis=0).tolist()
  busiest = max(policies, key=lambda p: sum(p.measured))
  by_size = dict(zip(busiest.sizes, counts))
  return {
      "speculation": busiest.summary(counts, sum(p.call for p in policies)),
      "speculative_batches": sum(n for size, n in by_size.items() if size > 1),
      "plain_batches": by_size.get(1, 0),
      "tree_sizes": {str(size): {"batches": n, "tokens_per_second": busiest.size_tps(size, rows)}
                     for size, n in sorted(by_size.items(), reverse=True) if size > 1}}
