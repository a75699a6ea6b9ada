"""Every docs code block and every example runs, against the tiny fixture, so none can rot.

The convention (DESIGN/common rules, "Docs code-block convention"):

* In ``README.md`` and ``docs/*.md`` every fenced block whose info string is
  ``python``, ``bash`` or ``sh`` runs, unless the line just before its
  opening fence is ``<!-- not run: REASON -->`` (a reason is required).
  README's first two blocks (the venv set-up commands) are skipped: CI and
  ``tests/test_demo.py`` run them.
* A ``toml`` block whose preceding line is ``<!-- file: RELATIVE/PATH.toml -->``
  is written to that path before the doc's later blocks run; every other
  ``toml`` block must parse.
* The blocks of one doc run in order, in one fresh work dir per doc (files
  persist between blocks, shell state does not), with ``python`` on PATH
  being the test interpreter.  Shell blocks run with ``-e`` (and bash with
  ``-o pipefail``): a failing command fails its block.
* The work dir holds the fixtures under the names docs use:
  ``models/sdxl-base.safetensors`` (tiny SDXL, seed 0), ``models/sdxl-base/``
  (the same as a diffusers folder), ``models/sdxl-other.safetensors`` (seed 1),
  ``data/images/`` (8 captioned images), ``data/val/`` (4 held-out images),
  ``configs/`` (the repo's configs made tiny, see :func:`tiny_config`) and
  ``examples/`` (a copy of the repo's examples).

Every ``examples/**/*.py`` / ``*.sh`` script runs the same way (``python
examples/x.py`` in a fresh work dir, default arguments), every
``examples/*.toml`` merge recipe runs through ``python -m lokr_trainer.merge
--recipe``, and every other example TOML must parse.  One test per doc and
per example; a failure names the doc and the block's line and shows its
stderr.  ``LOKR_DOCS_BLOCK_TIMEOUT`` (seconds, default 300) bounds each block;
``LOKR_DOCS_TIMINGS=FILE`` appends each block's wall time to FILE.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

REPO = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO / "examples"
RUN_LANGS = ("python", "bash", "sh")
README_SKIP = 2  # the venv set-up commands
BLOCK_TIMEOUT = float(os.environ.get("LOKR_DOCS_BLOCK_TIMEOUT", "300"))

# --------------------------------------------------------------------------------------- parsing

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*?)[ \t]*$")
_MARKER = re.compile(r"^<!--\s*(?P<kind>file|not run)\b\s*(?::\s*(?P<arg>.*?))?\s*-->$")


class DocError(Exception):
    """A doc breaks the block convention (a not-run marker without a reason, a bad file marker)."""


@dataclass(frozen=True)
class Block:
    doc: str
    line: int  # 1-based line of the opening fence
    lang: str  # first word of the info string, lower case ("" when none)
    code: str
    file: str | None = None  # <!-- file: PATH -->
    not_run: str | None = None  # <!-- not run: REASON -->

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def parse_blocks(text: str, doc: str = "<doc>") -> list[Block]:
    """Every fenced block of a Markdown text with the marker on the line just before it.

    Raises :class:`DocError` for a marker that breaks the convention.
    """
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m.group("fence"), len(m.group("indent"))
        lang = (m.group("info").split() or [""])[0].lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines):
            close = lines[i].strip()
            if close.startswith(fence[0] * len(fence)) and set(close) == {fence[0]}:
                break
            line = lines[i]
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
            i += 1
        else:
            raise DocError(f"{doc}:{start + 1}: the block opened here is never closed")
        i += 1
        prev = lines[start - 1].strip() if start > 0 else ""
        file = not_run = None
        mk = _MARKER.match(prev)
        if mk:
            arg = (mk.group("arg") or "").strip()
            if mk.group("kind") == "not run":
                if not arg:
                    raise DocError(f"{doc}:{start + 1}: '<!-- not run -->' needs a reason: <!-- not run: REASON -->")
                not_run = arg
            else:
                if not arg:
                    raise DocError(f"{doc}:{start + 1}: '<!-- file: -->' needs a relative path")
                if lang != "toml":
                    raise DocError(f"{doc}:{start + 1}: '<!-- file: {arg} -->' is for toml blocks, this one is {lang or 'untyped'}")
                if Path(arg).is_absolute() or ".." in Path(arg).parts:
                    raise DocError(f"{doc}:{start + 1}: '<!-- file: {arg} -->' must be a path inside the work dir")
                file = arg
        elif prev.startswith("<!--") and re.match(r"<!--\s*(not[ -]?run|file)", prev, re.I):
            raise DocError(f"{doc}:{start + 1}: unrecognised marker {prev!r} (write <!-- not run: REASON --> or <!-- file: PATH -->)")
        blocks.append(Block(doc, start + 1, lang, "\n".join(body) + "\n", file, not_run))
    return blocks


def doc_blocks(path: Path) -> list[Block]:
    """The blocks of one doc that the convention covers (README: without its first two)."""
    rel = path.relative_to(REPO).as_posix()
    blocks = parse_blocks(path.read_text(encoding="utf-8"), rel)
    return blocks[README_SKIP:] if rel == "README.md" else blocks


# --------------------------------------------------------------------------------------- fixtures

#: What :func:`tiny_config` rewrites in a copy of a repo config (every other setting is kept):
#:   model.path -> models/sdxl-base.safetensors; model.dtype/vae_dtype -> fp32 and
#:   train.mixed_precision -> no (CPU);
#:   data.path -> [data/images]; data.resolution 64, min_bucket 32, max_bucket 128, bucket_step 16;
#:   data.num_workers -> 0; data.cache_dir -> unset;
#:   train.max_steps -> 2 (train.epochs -> 0); train.batch_size -> 2; train.global_batch -> 2 when set,
#:   train.grad_accum -> 1 when set; train.save_every -> 1 when set; train.stop_after -> 1 when set;
#:   sample.width/height -> 64, sample.steps -> 2 (sample.every -> 2 when set);
#:   validation.path -> [data/val] when set, validation.max_samples -> 4, validation.batch_size -> 2
#:   (validation.every -> 2 when set).
TINY_RESOLUTION = {"resolution": 64, "min_bucket": 32, "max_bucket": 128, "bucket_step": 16}


def tiny_config(d: dict[str, Any]) -> dict[str, Any]:
    """A repo config (as a TOML dict) shrunk to run in seconds on the fixture; see the comment above."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    model = d.setdefault("model", {})
    model.update(path="models/sdxl-base.safetensors", dtype="fp32", vae_dtype="fp32")
    data = d.setdefault("data", {})
    data.update(path=["data/images"], num_workers=0, **TINY_RESOLUTION)
    data.pop("cache_dir", None)
    train = d.setdefault("train", {})
    train.update(max_steps=2, epochs=0, batch_size=2, mixed_precision="no")
    for key, value in (("global_batch", 2), ("grad_accum", 1), ("save_every", 1), ("stop_after", 1)):
        if train.get(key):
            train[key] = value
    if "sample" in d:
        d["sample"].update(width=64, height=64, steps=2)
        if d["sample"].get("every"):
            d["sample"]["every"] = 2
    if "validation" in d:
        v = d["validation"]
        if v.get("path"):
            v["path"] = ["data/val"]
        v.update(max_samples=4, batch_size=2)
        if v.get("every"):
            v["every"] = 2
    return d


@dataclass(frozen=True)
class Fixtures:
    root: Path


@pytest.fixture(scope="session")
def doc_fixtures(tmp_path_factory, tiny_sdxl) -> Fixtures:
    """The work-dir contents, built once per session (the tiny models take seconds to write)."""
    from lokr_trainer.testing import make_tiny_dataset, make_tiny_sdxl

    root = tmp_path_factory.mktemp("doc_fixtures")
    models = root / "models"
    models.mkdir()
    shutil.copy2(tiny_sdxl.single_file, models / "sdxl-base.safetensors")
    shutil.copytree(tiny_sdxl.diffusers_dir, models / "sdxl-base")
    other = make_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl_seed1"), seed=1)
    shutil.copy2(other.single_file, models / "sdxl-other.safetensors")
    make_tiny_dataset(root / "data" / "images", n=8, seed=0)
    make_tiny_dataset(root / "data" / "val", n=4, seed=1)
    configs = root / "configs"
    configs.mkdir()
    for src in sorted((REPO / "configs").glob("*.toml")):
        with src.open("rb") as f:
            d = tomllib.load(f)
        header = f"# {src.name} made tiny by tests/test_docs.py (model/data paths, sizes, steps; see tiny_config)\n"
        (configs / src.name).write_text(header + tomli_w.dumps(tiny_config(d)), encoding="utf-8")
    return Fixtures(root)


def make_workdir(fixtures: Fixtures, dest: Path) -> Path:
    """A fresh work dir: copies (not links: a doc may truncate or rewrite a file) of the fixtures."""
    shutil.copytree(fixtures.root, dest)
    if EXAMPLES_DIR.is_dir():
        shutil.copytree(EXAMPLES_DIR, dest / "examples", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def block_env(bin_dir: Path) -> dict[str, str]:
    """``python`` on PATH is this interpreter (a wrapper, so a venv keeps its site-packages)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    (bin_dir / "python3").write_text(wrapper.read_text())
    (bin_dir / "python3").chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1",
               PYTHONDONTWRITEBYTECODE="1")
    return env


# --------------------------------------------------------------------------------------- running


def _tail(text: str, n: int = 6000) -> str:
    return text if len(text) <= n else "…" + text[-n:]


def run_script(cmd: list[str], cwd: Path, env: dict[str, str], what: str, shown: str) -> float:
    """Run one block/example; on failure, fail the test naming it with its stderr."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"{what}: timed out after {BLOCK_TIMEOUT:g} s\n--- code ---\n{shown}\n--- stderr ---\n{_tail(err)}",
                    pytrace=False)
    if proc.returncode != 0:
        pytest.fail(
            f"{what}: exit status {proc.returncode}\n--- code ---\n{shown}\n--- stderr ---\n{_tail(proc.stderr)}"
            f"\n--- stdout ---\n{_tail(proc.stdout, 2000)}",
            pytrace=False,
        )
    return time.perf_counter() - t0


def run_blocks(blocks: list[Block], work: Path, scripts: Path, env: dict[str, str]) -> list[tuple[Block, float]]:
    """Write, parse or run a doc's blocks in order; returns the run ones with their seconds."""
    scripts.mkdir(parents=True, exist_ok=True)
    ran = []
    for b in blocks:
        if b.not_run is not None:
            continue
        if b.lang == "toml":
            try:
                tomllib.loads(b.code)
            except tomllib.TOMLDecodeError as e:
                pytest.fail(f"{b.where}: toml block does not parse: {e}\n--- code ---\n{b.code}", pytrace=False)
            if b.file is not None:
                target = work / b.file
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(b.code, encoding="utf-8")
            continue
        if b.lang not in RUN_LANGS:
            continue
        stem = re.sub(r"\W", "_", b.doc) + f"_L{b.line}"
        if b.lang == "python":
            script = scripts / f"{stem}.py"
            cmd = [sys.executable, str(script)]
        else:
            script = scripts / f"{stem}.{b.lang}"
            cmd = ["bash", "-e", "-o", "pipefail", str(script)] if b.lang == "bash" else ["sh", "-e", str(script)]
        script.write_text(b.code, encoding="utf-8")
        ran.append((b, run_script(cmd, work, env, f"{b.where}: {b.lang} block", b.code)))
    return ran


# --------------------------------------------------------------------------------------- the tests

DOCS = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))


def _examples() -> list[Path]:
    if not EXAMPLES_DIR.is_dir():
        return []
    found = [p for p in EXAMPLES_DIR.rglob("*") if p.is_file() and p.suffix in (".py", ".sh", ".toml")]
    return sorted(p for p in found if "__pycache__" not in p.parts)


EXAMPLES = _examples()


def _rel(p: Path) -> str:
    return p.relative_to(REPO).as_posix()


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_doc_blocks_run(doc: Path, doc_fixtures: Fixtures, tmp_path: Path):
    try:
        blocks = doc_blocks(doc)
    except DocError as e:
        pytest.fail(str(e), pytrace=False)
    work = make_workdir(doc_fixtures, tmp_path / "work")
    ran = run_blocks(blocks, work, tmp_path / "blocks", block_env(tmp_path / "bin"))
    _record_timings([(b.where, b.lang, seconds) for b, seconds in ran])
    # every block the convention says runs did run (nothing silently filtered out)
    assert [b.line for b, _ in ran] == [b.line for b in blocks if b.lang in RUN_LANGS and b.not_run is None]
    shutil.rmtree(work, ignore_errors=True)


def _record_timings(rows: list[tuple[str, str, float]]) -> None:
    """With ``LOKR_DOCS_TIMINGS=FILE``, append ``where<TAB>lang<TAB>seconds`` per run block/example."""
    path = os.environ.get("LOKR_DOCS_TIMINGS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(f"{where}\t{lang}\t{seconds:.2f}\n" for where, lang, seconds in rows)


def _merge_recipe(d: dict[str, Any]) -> bool:
    return "base" in d and "out" in d


@pytest.mark.parametrize("example", EXAMPLES, ids=_rel)
def test_example_runs(example: Path, doc_fixtures: Fixtures, tmp_path: Path):
    rel = example.relative_to(REPO)
    work = make_workdir(doc_fixtures, tmp_path / "work")
    env = block_env(tmp_path / "bin")
    if example.suffix == ".toml":
        with example.open("rb") as f:
            d = tomllib.load(f)  # every example TOML parses
        if example.parent == EXAMPLES_DIR and _merge_recipe(d):
            cmd = [sys.executable, "-m", "lokr_trainer.merge", "--recipe", str(rel)]
            _record_timings([(str(rel), "recipe", run_script(cmd, work, env, f"{rel}: merge recipe",
                                                              " ".join(["python"] + cmd[1:])))])
            check_recipe_output(work / "examples" / d["out"], d, work / "examples")
    elif example.suffix == ".py":
        seconds = run_script([sys.executable, str(rel)], work, env, f"{rel}: example", f"python {rel}")
        _record_timings([(str(rel), "python", seconds)])
    else:
        seconds = run_script(["bash", "-e", "-o", "pipefail", str(rel)], work, env, f"{rel}: example", f"bash {rel}")
        _record_timings([(str(rel), "bash", seconds)])
    shutil.rmtree(work, ignore_errors=True)


def check_recipe_output(out: Path, recipe: dict[str, Any], base_dir: Path) -> None:
    """A merge recipe's output has the first base's keys; restored embeddings are the reference's bits."""
    from safetensors import safe_open

    from lokr_trainer.merge import EMBEDDING_KEYS

    assert out.is_file(), f"the recipe did not write {out}"
    first = recipe["base"][0]
    first = base_dir / (first["path"] if isinstance(first, dict) else first)
    with safe_open(str(out), "pt") as o, safe_open(str(first), "pt") as b:
        assert set(o.keys()) == set(b.keys())
        ref = recipe.get("restore_embeddings")
        if ref:
            with safe_open(str(base_dir / ref), "pt") as r:
                keys = [k for k in EMBEDDING_KEYS if k in r.keys()]
                assert len(keys) == 4
                for k in keys:
                    assert o.get_tensor(k).float().equal(r.get_tensor(k).float()), k
        # a summed tensor is Σ wᵢ·Wᵢ in fp32, rounded once to the output dtype
        bases = [x if isinstance(x, dict) else {"path": x} for x in recipe["base"]]
        if len(bases) > 1 and all("weight" in x for x in bases):
            key = "model.diffusion_model.input_blocks.0.0.weight"
            total = 0
            for x in bases:
                with safe_open(str(base_dir / x["path"]), "pt") as f:
                    total = total + float(x["weight"]) * f.get_tensor(key).float()
            got = o.get_tensor(key)
            assert got.equal(total.to(got.dtype)), key


# --------------------------------------------------------------------------------------- the harness itself


def test_parse_blocks_reads_markers_fences_and_lines():
    text = "\n".join([
        "# t",  # 1
        "```bash",  # 2
        "echo hi",
        "```",
        "<!-- not run: needs 2 GPUs -->",  # 5
        "```python",  # 6
        "print(1)",
        "```",
        "<!-- file: configs/run.toml -->",  # 9
        "````toml",  # 10
        "a = 1",
        "```",
        "b = 2",
        "````",
        "- item",
        "  ```sh",  # 16: indented in a list
        "  ls",
        "  ```",
    ])
    blocks = parse_blocks(text, "d.md")
    assert [(b.line, b.lang, b.not_run, b.file) for b in blocks] == [
        (2, "bash", None, None), (6, "python", "needs 2 GPUs", None), (10, "toml", None, "configs/run.toml"),
        (16, "sh", None, None),
    ]
    assert blocks[2].code == "a = 1\n```\nb = 2\n" and blocks[3].code == "ls\n"


@pytest.mark.parametrize("marker, message", [
    ("<!-- not run -->", "needs a reason"),
    ("<!-- not run: -->", "needs a reason"),
    ("<!-- not-run: x -->", "unrecognised marker"),
    ("<!-- file: /etc/x.toml -->", "inside the work dir"),
    ("<!-- file: x.py -->", "is for toml blocks"),
])
def test_markers_that_break_the_convention_are_refused(marker, message):
    lang = "python" if "x.py" in marker else "toml"
    with pytest.raises(DocError, match=f"^d.md:2: .*{message}"):
        parse_blocks(f"{marker}\n```{lang}\na = 1\n```\n", "d.md")


def test_blocks_share_files_not_shell_state_and_a_failure_names_doc_and_line(doc_fixtures, tmp_path):
    text = "\n".join([
        "<!-- file: cfg/a.toml -->", "```toml", "x = 3", "```",
        "```bash", "export V=1", "echo made > made.txt", "```",
        "```python", "import os, tomllib", "assert open('made.txt').read() == 'made\\n'",
        "assert tomllib.load(open('cfg/a.toml', 'rb'))['x'] == 3", "assert 'V' not in os.environ",
        "assert os.path.isfile('models/sdxl-base.safetensors') and os.path.isdir('data/val')",
        "```",
        "```bash", "false", "echo not reached", "```",
    ])
    blocks = parse_blocks(text, "t.md")
    work = make_workdir(doc_fixtures, tmp_path / "w")
    env = block_env(tmp_path / "bin")
    with pytest.raises(pytest.fail.Exception, match=r"(?s)^t\.md:16: bash block: exit status 1\n--- code ---\nfalse"):
        run_blocks(blocks, work, tmp_path / "s", env)
    assert (work / "made.txt").read_text() == "made\n"
    # `python` in a block is this interpreter
    out = subprocess.run(["bash", "-c", "python -c 'import sys; print(sys.executable)'"], env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == sys.executable


def test_the_tiny_configs_keep_the_recipe_settings(doc_fixtures):
    for src in sorted((REPO / "configs").glob("*.toml")):
        with src.open("rb") as f:
            orig = tomllib.load(f)
        with (doc_fixtures.root / "configs" / src.name).open("rb") as f:
            tiny = tomllib.load(f)
        assert tiny["model"]["path"] == "models/sdxl-base.safetensors" and tiny["data"]["path"] == ["data/images"]
        assert tiny["train"]["max_steps"] == 2 and tiny["data"]["resolution"] == 64
        # the recipe settings that are not about size are untouched
        for table in ("lokr", "caption", "diffusion", "optimizer", "scheduler"):
            assert tiny.get(table) == orig.get(table), (src.name, table)
        from lokr_trainer.config import load_config

        load_config(doc_fixtures.root / "configs" / src.name)  # a valid run config
