"""
Writes README.md's flag tables from the programs' own --help text (each Config field's comment), so the two cannot
drift: `python .ci/flag_tables.py` rewrites every table between `<!-- flags FILE -->` and `<!-- /flags -->`;
`python .ci/flag_tables.py --check` exits 1 if README.md differs from what it would write (the tests run this).
"""
import dataclasses
import importlib
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"(<!-- flags (\S+)\.py -->\n)(.*?)(<!-- /flags -->)", re.S)


def cell(text):
    return str(text).replace("|", "\\|")


def table(module_name):
    """A markdown table of a program's flags: name, default, help."""
    sys.path.insert(0, ROOT)
    module = importlib.import_module(module_name)
    helps = module.config_help()
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(module.Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            flag, default = f"{flag}` / `--no-{flag[2:]}", "on" if f.default else "off"
        else:
            default = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            default = f"`{default!s}`" if default != "" else '`""`'
        rows.append(f"| `{flag}` | {default} | {cell(helps.get(f.name, ''))} |")
    return "\n".join(rows) + "\n"


def render(readme):
    return BLOCK.sub(lambda m: m.group(1) + table(m.group(2)) + m.group(4), readme)


if __name__ == "__main__":
    path = os.path.join(ROOT, "README.md")
    old = open(path, encoding="utf-8").read()
    new = render(old)
    if "--check" in sys.argv:
        if new != old:
            print("README.md flag tables differ from the programs' --help text; run: python .ci/flag_tables.py")
            sys.exit(1)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
