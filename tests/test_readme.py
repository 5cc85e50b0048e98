"""The README stays true: its example runs and its mechanism table matches the registry."""

import os
import re

from attn_jax import registry as registry_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme() -> str:
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    return f.read()


def test_readme_example_runs():
  code = re.search(r"## Use it in your own JAX code\n\n```python\n(.*?)```", readme(), re.S)
  assert code, "README lost its usage example"
  namespace = {}
  exec(compile(code.group(1), "README.md", "exec"), namespace)  # noqa: S102
  assert namespace["out"].shape == (2, 1024, 8, 64)
  assert namespace["lse"].shape == (2, 8, 1024)
  assert namespace["grads"].shape == namespace["q"].shape


def test_readme_mechanism_table_is_fresh():
  text = readme()
  assert registry_cli.readme_with_table(text) == text, (
    "README mechanism table is stale: run python -m attn_jax.registry --write-readme README.md"
  )
