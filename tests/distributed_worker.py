"""One process of the 2-process CPU test: ``distributed_worker.py PORT RANK WORKDIR CONFIG``."""

import os
import sys

import jax

port, rank, workdir, spec = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=rank)

from attn_jax import config_lib, train  # noqa: E402

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
config = config_lib.load(os.path.join(root, spec))
config.batch_size, config.total_steps = 8, 4
config.eval_every = config.checkpoint_every = 2
summary = train.train_and_evaluate(config, workdir, progress=False)
print(f"devices={jax.device_count()} processes={jax.process_count()} summary={summary}")
jax.distributed.shutdown()
