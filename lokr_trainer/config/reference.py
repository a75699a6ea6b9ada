"""The configuration reference, generated from :func:`~lokr_trainer.config.schema`.

``python -m lokr_trainer.config reference -o docs/config-reference.md`` writes
it; ``--check`` exits 1 when the file differs from what the schema gives
(tests and CI run it), so the page cannot go stale.  Every key must have a
help text: :func:`undocumented` lists those that do not, and rendering
refuses them, so a new key without help fails the generator and the tests.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from lokr_trainer.config import run_config
from lokr_trainer.config.run_config import FieldHelp, Rule, schema
from lokr_trainer.errors import ConfigError

DEFAULT_PATH = "docs/config-reference.md"
COMMAND = f"python -m lokr_trainer.config reference -o {DEFAULT_PATH}"

USAGE = "usage: python -m lokr_trainer.config reference [-o FILE] [--check]"


def undocumented(tables: Mapping[str, Sequence[FieldHelp]]) -> list[str]:
    """Dotted keys whose help text is empty (each must say what the key does)."""
    return [f"{t}.{f.name}" for t, fields in tables.items() for f in fields if not f.help.strip()]


def table_classes() -> dict[str, type]:
    """The dataclass behind each schema table (for its description)."""
    from lokr_trainer.lokr.targets import FactorRule

    out = dict(run_config.TABLES)
    out["lokr.rules"] = FactorRule
    return out


def toml_value(value: Any) -> str:
    """A default as it is written in a TOML file (``None``: not set)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def allowed(table: str, f: FieldHelp) -> str:
    """The values the validator accepts for one key, in words (choices, ranges, multiples)."""
    rule: Rule | None = run_config.RULES.get(f"{table}.{f.name}")
    if f.choices:
        return ", ".join(f"`{c}`" for c in f.choices)
    if rule is None:
        return ""
    parts = []
    if rule.describe():
        parts.append(rule.describe())
    if rule.multiple_of:
        parts.append(f"multiple of {rule.multiple_of}")
    if rule.length is not None:
        parts.append(f"exactly {rule.length} items")
    if rule.required:
        parts.append("required")
    if rule.scalar_ok:
        parts.append("one string allowed for a list")
    return ", ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _type(f: FieldHelp) -> str:
    names = [n.strip() for n in f.type.split("|")]
    optional = "None" in names
    names = [n for n in names if n != "None"]
    return " or ".join(names) + (" (optional)" if optional or f.default is None else "")


def _description(cls: type) -> str:
    doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split()).replace("``", "`")
    doc = re.sub(r"^(The )?`\[\[?[\w.]+\]\]?`( table)?:\s*", "", doc)  # the heading already names the table
    return doc[:1].upper() + doc[1:]


def render(tables: Mapping[str, Sequence[FieldHelp]] | None = None) -> str:
    """The whole reference page (Markdown) for ``tables`` (default: the live schema)."""
    tables = schema() if tables is None else tables
    missing = undocumented(tables)
    if missing:
        raise ConfigError(f"config keys without a help text: {', '.join(missing)} (give each field a help text)")
    classes = table_classes()
    lines = [
        "# Configuration reference",
        "",
        f"Generated from the config schema (`lokr_trainer.config.schema()`) by `{COMMAND}`; "
        "do not edit it by hand (a test fails when it is stale).",
        "",
        "A run config is one TOML file of the tables below (`python -m lokr_trainer.train --config run.toml`); "
        "every key can also be set on the command line with `--set table.key=value`. "
        "A key left out takes its default; an unknown key or a value outside what is allowed is refused "
        "before any model loads, with a message naming the key. "
        "`lokr.rules` is an array of tables (`[[lokr.rules]]`), tried in order, the first match wins.",
        "",
        "Tables: " + ", ".join(f"[`{t}`](#{t.replace('.', '')})" for t in tables) + ".",
    ]
    for table, fields in tables.items():
        heading = f"[[{table}]]" if table == "lokr.rules" else f"[{table}]"
        lines += ["", f"## {table}", ""]
        cls = classes.get(table)
        intro = _description(cls) if cls is not None else ""
        lines.append(f"`{heading}`" + (f" — {intro}" if intro else ""))
        lines += ["", "| key | type | default | allowed | what it does |", "| --- | --- | --- | --- | --- |"]
        for f in fields:
            lines.append(
                "| "
                + " | ".join(
                    _cell(c)
                    for c in (f"`{f.name}`", _type(f), f"`{toml_value(f.default)}`", allowed(table, f), f.help.strip())
                )
                + " |"
            )
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def check(path: str | Path = DEFAULT_PATH) -> str | None:
    """``None`` when ``path`` holds exactly the rendered reference, else a one-line reason."""
    path = Path(path)
    try:
        current = path.read_text(encoding="utf-8")
    except OSError:
        return f"{path} is missing: generate it with {COMMAND}"
    if current != render():
        return f"{path} is stale (the config schema changed): regenerate it with {COMMAND}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    out: str | None = None
    do_check = False
    while args:
        a = args.pop(0)
        if a in ("-h", "--help"):
            print(USAGE)
            return 0
        if a == "--check":
            do_check = True
        elif a in ("-o", "--output"):
            if not args:
                print(f"error: {a} needs a file name ({USAGE})", file=sys.stderr)
                return 2
            out = args.pop(0)
        else:
            print(f"error: unknown argument {a!r} ({USAGE})", file=sys.stderr)
            return 2
    try:
        if do_check:
            problem = check(out or DEFAULT_PATH)
            if problem:
                print(f"error: {problem}", file=sys.stderr)
                return 1
            print(f"{out or DEFAULT_PATH} is up to date")
            return 0
        text = render()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if out is None:
        sys.stdout.write(text)
    else:
        _write(Path(out), text)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
