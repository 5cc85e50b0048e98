"""Config helpers: the ``get_config(arg)`` argument string, loading config files, JSON.

A config file is Python with ``get_config(arg)``; variants go in the argument string,
``configs/mqar.py:attn=moh,d_model=128,runlocal`` (a bare name is True). Values are parsed
as Python literals where they can be, else kept as strings; ``a+b+c`` becomes a list (so a
per-layer attention list fits in one flag: ``attn=sliding_window+sliding_window+mha``).
"""

import ast
import importlib.util
import json
import os

import ml_collections

REQUIRED = ("total_steps", "eval_every", "checkpoint_every", "seed", "model.attention")


def _literal(text: str):
  if "+" in text and not text.lstrip("-+").replace(".", "").replace("e", "").isdigit():
    return [_literal(t) for t in text.split("+")]
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``"k1=v1,k2,..."`` over ``defaults``; unknown keys raise ValueError."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    out[key] = _literal(value.strip()) if value else True
  return ml_collections.ConfigDict(out)


def _set_path(config, path: str, value):
  *parents, leaf = path.split(".")
  node = config
  for name in parents:
    if name not in node:
      raise ValueError(f"override {path!r}: no field {name!r}")
    node = node[name]
  if leaf not in node:
    raise ValueError(f"override {path!r}: no field {leaf!r}; fields: {sorted(node.keys())}")
  node[leaf] = value


def load(spec: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """Loads ``path/to/config.py[:arg]`` and applies ``{"model.num_layers": 4, ...}``."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise ValueError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location("_attn_jax_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  for key, value in (overrides or {}).items():
    _set_path(config, key, value)
  return config


def to_dict(config) -> dict:
  return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)


def write_json(config, path: str) -> None:
  """Writes the resolved config atomically (a crash never leaves half a file)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(to_dict(config), f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


def read_json(path: str) -> ml_collections.ConfigDict:
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def validate(config) -> None:
  """Checks the fields every config must have (ValueError naming what is missing)."""
  for path in REQUIRED:
    node = config
    for name in path.split("."):
      if name not in node:
        raise ValueError(f"config is missing {path!r}; every config needs {REQUIRED}")
      node = node[name]
