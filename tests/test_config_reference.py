"""docs/config-reference.md is generated from the config schema and cannot go stale.

The committed page must equal a fresh render, every key must carry a help
text (a new key without one fails here and in the generator), every key
appears in the page, and every list of allowed values in the page is the
one the validator enforces.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from lokr_trainer.config import RunConfig, reference, run_config, schema
from lokr_trainer.config.__main__ import main as config_main
from lokr_trainer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "config-reference.md"


def sections(text: str) -> dict[str, str]:
    """``## table`` heading -> the text under it."""
    parts = re.split(r"^## (\S+)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def rows(section: str) -> dict[str, list[str]]:
    """key -> the cells of its table row (| `key` | type | default | allowed | help |)."""
    out = {}
    for line in section.splitlines():
        m = re.match(r"^\| `([\w]+)` \|", line)
        if m:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            out[m.group(1)] = cells
    return out


# ----------------------------------------------------------------------------- not stale


def test_the_committed_reference_is_the_rendered_schema():
    assert PAGE.read_text(encoding="utf-8") == reference.render(), (
        f"docs/config-reference.md is stale: regenerate it with {reference.COMMAND}"
    )
    assert reference.check(PAGE) is None
    assert config_main(["reference", "--check", "-o", str(PAGE)]) == 0


def test_a_stale_reference_fails_the_check_with_the_regenerate_command(tmp_path, capsys):
    stale = tmp_path / "config-reference.md"
    stale.write_text(reference.render().replace("| `init_lokr` |", "| `init_lokr_old` |"), encoding="utf-8")
    problem = reference.check(stale)
    assert problem == f"{stale} is stale (the config schema changed): regenerate it with {reference.COMMAND}"
    capsys.readouterr()
    assert config_main(["reference", "--check", "-o", str(stale)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {problem}\n"
    assert "missing" in reference.check(tmp_path / "nope.md")


def test_the_command_writes_the_page_and_prints_it(tmp_path, capsys):
    out = tmp_path / "sub" / "ref.md"
    assert config_main(["reference", "-o", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == reference.render()
    capsys.readouterr()
    assert config_main(["reference"]) == 0
    assert capsys.readouterr().out == reference.render()
    assert config_main(["reference", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown argument '--bogus'") and err.count("\n") == 1


def test_the_header_says_generated_and_by_which_command():
    first = PAGE.read_text(encoding="utf-8").splitlines()[:4]
    assert any("Generated" in line and reference.COMMAND in line for line in first)


# ----------------------------------------------------------------------------- help texts


def test_every_key_of_every_table_has_a_help_text():
    tables = schema()
    assert {"model", "lokr", "lokr.rules", "caption", "data", "train"} <= set(tables)
    assert reference.undocumented(tables) == []
    for fields in tables.values():
        assert all(len(f.help.strip()) > 10 for f in fields)


def test_a_key_added_without_help_fails_the_check_and_the_generator(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class ModelWithNewKey(run_config.ModelConfig):
        documented: int = run_config._f(1, "A key with a help text.")
        new_key: int = 0  # no help: what a forgetful change looks like

    monkeypatch.setitem(run_config.TABLES, "model", ModelWithNewKey)
    tables = schema()
    assert [f.name for f in tables["model"]][-2:] == ["documented", "new_key"]
    assert reference.undocumented(tables) == ["model.new_key"]
    with pytest.raises(ConfigError, match=r"config keys without a help text: model\.new_key"):
        reference.render()
    assert config_main(["reference"]) == 2


def test_a_lokr_or_caption_key_without_an_entry_in_its_help_table_fails(monkeypatch):
    monkeypatch.delitem(run_config.LOKR_HELP, "factor")
    monkeypatch.delitem(run_config.CAPTION_HELP, "separator")
    monkeypatch.delitem(run_config.LOKR_RULE_HELP, "skip")
    assert reference.undocumented(schema()) == ["lokr.factor", "lokr.rules.skip", "caption.separator"]


# ----------------------------------------------------------------------------- contents


def test_every_key_appears_in_its_table_with_type_default_and_help():
    page = sections(PAGE.read_text(encoding="utf-8"))
    tables = schema()
    assert list(page) == list(tables)
    for table, fields in tables.items():
        found = rows(page[table])
        assert list(found) == [f.name for f in fields], table
        for f in fields:
            cells = found[f.name]
            assert len(cells) == 5, (table, f.name, cells)
            assert cells[2] == f"`{reference.toml_value(f.default)}`".replace("|", "\\|")
            assert cells[4] == f.help.strip().replace("|", "\\|")
            assert cells[1].split(" ")[0] == f.type.split(" | ")[0]


def test_defaults_in_the_page_are_the_defaults_a_config_gets():
    cfg = RunConfig.from_dict(_minimal()).to_dict()
    for table, fields in schema().items():
        if table == "lokr.rules":
            continue
        for f in fields:
            if f"{table}.{f.name}" in _SET_BY_MINIMAL or f.default is None:
                continue  # what _minimal() sets, and unset keys the config resolves (te1_lr: unet_lr, ...)
            assert cfg[table].get(f.name) == f.default, f"{table}.{f.name}"


_SET_BY_MINIMAL = {"model.path", "data.path", "train.max_steps"}


def _minimal() -> dict:
    return {"model": {"path": "m.safetensors"}, "data": {"path": ["images"]}, "train": {"max_steps": 1}}


def _with(table: str, key: str, value) -> dict:
    d = _minimal()
    if table == "lokr.rules":
        d["lokr"] = {"rules": [{"pattern": "*", key: value}] if key != "pattern" else [{key: value}]}
    else:
        d.setdefault(table, {})[key] = value
    return d


def test_every_allowed_values_list_is_what_the_validator_enforces():
    page = sections(PAGE.read_text(encoding="utf-8"))
    with_choices = 0
    for table, fields in schema().items():
        found = rows(page[table])
        for f in fields:
            if not f.choices:
                continue
            with_choices += 1
            # the page lists exactly these values
            assert re.findall(r"`([^`]+)`", found[f.name][3]) == [str(c) for c in f.choices], f"{table}.{f.name}"
            is_list = f.type.startswith("list[")
            for c in f.choices:
                RunConfig.from_dict(_with(table, f.name, [c] if is_list else c))  # accepted
            bad = ["not-a-choice"] if is_list else "not-a-choice"
            named = "lokr.rules[0]." if table == "lokr.rules" else f"{table}."
            with pytest.raises(ConfigError, match=re.escape(named + f.name)):
                RunConfig.from_dict(_with(table, f.name, bad))
    assert with_choices >= 15
    # and a key the page lists without choices takes a value outside any list
    RunConfig.from_dict(_with("model", "init_lokr", "any/file.safetensors"))
