"""jaxinfer compile: ahead-of-time compilation of the engine's steps for a target not here.

TPU targets are compiled with libtpu's compile-only client and checked against the chip's HBM;
cuda is lowered only. Shapes only: a preset or a directory's config.json, no weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import flags

from jaxinfer.cli import fail, no_positional_args
from jaxinfer.cli.common import define_implementation_flag, define_mesh_flag, define_model_flags
from jaxinfer.files import write_atomically

define_model_flags(devices=False, cache_dir=False)  # (shapes only: nothing runs or is built)
define_mesh_flag()
flags.FLAGS["model"].help = ("preset:NAME (e.g. preset:llama3-8b), 'embedded', or a Hugging Face "
                             "or jaxinfer model directory (its config.json is read, and a "
                             "quantized checkpoint's quantization.json: it compiles in its "
                             "format).")
flags.DEFINE_string("target", None, "tpu:GEN:TOPOLOGY (GEN v4, v5e, v5p or v6e; e.g. "
                    "tpu:v5e:2x4) to compile for, or cuda to lower for a GPU.")
flags.DEFINE_string("output", None, "Also write the report here as JSON.")
flags.DEFINE_integer("batch_size", 8, "Engine slots per replica.", lower_bound=1)
flags.DEFINE_integer("kv_pages", None, "KV pool size in pages per replica (default: 1.5 x slots "
                     "x --max_seq_len).", lower_bound=1)
flags.DEFINE_integer("page_size", 16, "Tokens per KV page.", lower_bound=1)
flags.DEFINE_integer("chunk_size", 32, "Prompt tokens per prefill lane per step.", lower_bound=1)
flags.DEFINE_integer("chunk_lanes", 4, "Prefill lanes per step.", lower_bound=1)
flags.DEFINE_integer("decode_steps", 8, "Decode steps run in one dispatch.", lower_bound=1)
flags.DEFINE_integer("max_seq_len", None, "Longest request (prompt + output) the pages per "
                     "sequence are sized for (default: the model's context).", lower_bound=2)
define_implementation_flag()
flags.DEFINE_string("sparsity", "dense", "Attention pattern: dense, sinks_window:SINKS,WINDOW, "
                    "block_topk:TOPK[,BLOCK] or vertical_slash:V,S[,BLOCK] (a prompt prefilled "
                    "whole: the lane compiled is the longest prompt).")
flags.DEFINE_enum("speculative", "none", ["none", "ngram", "lookahead", "recycling", "layerskip",
                                         "eagle"],
                  "Also compile this proposer's verification steps (eagle: its draft layer by "
                  "shape, drafting over the whole vocabulary; no trained weights are read).")
flags.DEFINE_integer("num_draft_tokens", 4, "Drafted tokens per step (ngram, layerskip, eagle's "
                     "chain); the lookahead trie's depth.", lower_bound=1)
flags.DEFINE_string("tree", "4,2,1,1", "Token Recycling's tree (children per depth); nodes:N "
                    "for the lookahead trie's size; dynamic[:NODES,TOPK,DEPTH] for EAGLE-2's "
                    "dynamic tree.")
flags.DEFINE_string("draft_layers", None, "--speculative=layerskip: layers the draft keeps "
                    "(default: the first half).")
flags.DEFINE_string("quantize", None, "Serve the weights quantized in this format (int8, "
                    "int4:g128, fp8_e4m3, ... as jaxinfer quantize --format): their memory per "
                    "device is what the report counts.")
flags.DEFINE_list("quantize_include", [], "With --quantize: also quantize these (as jaxinfer "
                  "quantize --include): embed, lm_head, norm.")
flags.DEFINE_string("kv_cache_dtype", None, "int8: the engine's KV pages in int8 with per-token "
                    "scales (as jaxinfer generate --kv_cache_dtype).")
flags.mark_flags_as_required(["target"])
FLAGS = flags.FLAGS


def _job():
  from jaxinfer.aot import CompileJob
  names = ("target", "model", "dtype", "mesh", "batch_size", "kv_pages", "page_size",
           "chunk_size", "chunk_lanes", "decode_steps", "max_seq_len", "implementation",
           "sparsity", "speculative", "num_draft_tokens", "tree", "draft_layers", "quantize",
           "kv_cache_dtype")
  return CompileJob(**{name: getattr(FLAGS, name) for name in names},
                    quantize_include=tuple(FLAGS.quantize_include))


def _check_output(path: str | None) -> None:
  if path is None:
    return
  if Path(path).is_dir():
    fail(f"--output: {path!r} is a directory, expected a file path")
  if not Path(path).absolute().parent.is_dir():
    fail(f"--output: directory {str(Path(path).absolute().parent)!r} does not exist")


def main(argv: list[str]) -> None:
  no_positional_args(argv)
  _check_output(FLAGS.output)
  from jaxinfer import aot
  log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if sys.stderr.isatty() else None
  try:
    aot.prepare_host(aot.parse_target(FLAGS.target), FLAGS.mesh)  # before JAX starts
    report = aot.run(_job(), log=log)
  except aot.CompileError as e:
    fail(str(e))
  except aot.StepFailed as e:  # the compiler's own message: what a kernel author needs
    print(f"error: the compiler for {FLAGS.target} refused the {e}", file=sys.stderr)
    sys.exit(1)
  print(report.table())
  if FLAGS.output:
    try:
      write_atomically(FLAGS.output, json.dumps(report.as_dict(), indent=2, default=str) + "\n")
    except OSError as e:
      fail(f"--output: {e}")
