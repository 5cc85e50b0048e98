"""Prints the mechanism registry: ``python -m attn_jax.registry [--json | --markdown]``.

``--write-readme PATH`` / ``--check-readme PATH`` regenerate / verify the mechanism table
between the ``<!-- registry-table -->`` markers of a README.
"""

import argparse
import json
import sys

from attn_jax.attention import registry

BEGIN, END = "<!-- registry-table:begin -->", "<!-- registry-table:end -->"


def markdown_table() -> str:
  lines = [
    "| id | family | tier | implementations | patterns | decode | paper |",
    "|---|---|---|---|---|---|---|",
  ]
  for m in registry.all_mechanisms():
    patterns = ", ".join(p for p in registry.PATTERNS if p in m.patterns)
    lines.append(
      f"| `{m.id}` | ({m.family}) | {m.tier} | {', '.join(m.implementations)} | "
      f"{patterns} | {'yes' if m.decode else 'no'} | {m.paper} |"
    )
  return "\n".join(lines)


def text_table() -> str:
  rows = [
    (
      m.id,
      m.family,
      str(m.tier),
      ",".join(m.implementations),
      ",".join(p for p in registry.PATTERNS if p in m.patterns),
      str(m.decode),
    )
    for m in registry.all_mechanisms()
  ]
  header = ("id", "family", "tier", "implementations", "patterns", "decode")
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
  fmt = "  ".join(f"{{:<{w}}}" for w in widths)
  return "\n".join([fmt.format(*header)] + [fmt.format(*r) for r in rows])


def readme_with_table(text: str) -> str:
  if BEGIN not in text or END not in text:
    raise ValueError(f"README has no {BEGIN} ... {END} markers")
  head, rest = text.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  return f"{head}{BEGIN}\n{markdown_table()}\n{END}{tail}"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--json", action="store_true", help="a JSON list of entries")
  group.add_argument("--markdown", action="store_true", help="a markdown table")
  group.add_argument("--write-readme", metavar="PATH", help="regenerate the README table")
  group.add_argument("--check-readme", metavar="PATH", help="exit 1 if the table is stale")
  args = parser.parse_args(argv)
  if args.json:
    print(json.dumps([m.as_json() for m in registry.all_mechanisms()], indent=1))
  elif args.markdown:
    print(markdown_table())
  elif args.write_readme or args.check_readme:
    path = args.write_readme or args.check_readme
    with open(path, encoding="utf-8") as f:
      text = f.read()
    new = readme_with_table(text)
    if args.check_readme:
      if new != text:
        print(
          f"{path}: the mechanism table is stale; run "
          f"python -m attn_jax.registry --write-readme {path}",
          file=sys.stderr,
        )
        return 1
      return 0
    with open(path, "w", encoding="utf-8") as f:
      f.write(new)
  else:
    print(text_table())
  return 0


if __name__ == "__main__":
  sys.exit(main())
