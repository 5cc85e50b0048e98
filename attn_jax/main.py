r"""Command line: ``python -m attn_jax.main --config=configs/mqar.py:attn=mha --workdir=runs/x``.

Overrides: ``--config.model.num_layers=4``. Relaunching on the same workdir resumes it;
``--resume_from=<run dir>`` continues another run (its model config is read back). On a
multi-host TPU slice the same command runs on every host (``jax.distributed`` is initialised
when the environment says so, or with ``--distributed``). SIGTERM saves and exits 0.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "config file, path[:arg]", lock_config=False)
flags.DEFINE_string("workdir", None, "run directory (checkpoints, config.json, metrics)")
flags.DEFINE_string("resume_from", None, "continue from this run directory's latest checkpoint")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")
flags.DEFINE_bool(
  "keep_freed_memory",
  True,
  "glibc keeps and reuses freed memory (attn_jax.host_memory): on CPU, XLA scratch above "
  "32 MiB is otherwise page-faulted in again on every step",
)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if FLAGS.keep_freed_memory:  # before JAX starts its threads
    from attn_jax import host_memory

    host_memory.keep_freed_memory()
  import jax

  if FLAGS.distributed or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()
  from attn_jax import train

  summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir, resume_from=FLAGS.resume_from)
  if jax.process_index() == 0:
    print(" ".join(f"{k}={v}" for k, v in summary.items()), file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
