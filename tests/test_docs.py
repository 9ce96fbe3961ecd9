"""The manual stays true: the sweep YAML reference is the one the config models generate, every key has a
description, and the code blocks marked `<!-- runs in tests/test_docs.py -->` in the README and docs/ run as
written, against a small finished synthetic sweep named as the docs name it (results/my-sweep)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.reference import reference
from orchestrator.scheduler import run_sweep

REPO = Path(__file__).resolve().parents[1]
MARK = "<!-- runs in tests/test_docs.py -->"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_the_sweep_reference_is_generated_from_the_models():
    page = REPO / "docs" / "sweep-reference.md"
    assert page.read_text() == reference(), "docs/sweep-reference.md is stale: run `make docs`"


def test_every_sweep_key_has_a_description():
    bare = [line.split("|")[1].strip() for line in reference().splitlines()
            if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert not bare, f"keys without a description (a comment beside the field, or Field(description=)): {bare}"


def _marked_blocks() -> list[tuple[str, str, str]]:
    """(page:line, language, code) of every fenced block right after the marker."""
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in re.finditer(re.escape(MARK) + r"\n```(\w+)\n(.*?)```", text, re.S):
            line = text[: m.start()].count("\n") + 1
            out.append((f"{page.relative_to(REPO)}:{line}", m.group(1), m.group(2)))
    return out


BLOCKS = _marked_blocks()


def test_the_docs_mark_blocks_to_run():
    assert len(BLOCKS) >= 4 and {lang for _, lang, _ in BLOCKS} == {"python", "bash"}


@pytest.fixture(scope="module")
def world(tmp_path_factory, _ray_local_session):
    """A folder holding sweeps/my-sweep.yaml, finished into results/my-sweep (and results/gpt2-l8-topk, the
    README's name): TopK at four widths and two k, enough for every law the docs fit."""
    from conftest import ensure_local_ray

    ensure_local_ray(_ray_local_session)
    root = tmp_path_factory.mktemp("docs-world")
    (root / "sweeps").mkdir()
    spec = {"name": "my-sweep",
            "data": {"synthetic": {"d_in": 16, "n_features": 64, "active_per_vector": 4},
                     "train_tokens": 40960, "eval_tokens": 1024},
            "grid": {"arch": ["topk"], "n_latents": [64, 128, 256, 512], "k": [8, 32]},
            "train": {"batch_size": 512, "init_samples": 512}, "resources": {"cpus": 1}}
    (root / "sweeps" / "my-sweep.yaml").write_text(yaml.safe_dump(spec))
    assert run_sweep(root / "sweeps" / "my-sweep.yaml", root / "results", echo=lambda s: None) == 0
    (root / "results" / "gpt2-l8-topk").symlink_to(root / "results" / "my-sweep")
    return root


@pytest.mark.parametrize("where, lang, code", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_marked_block_runs_as_written(world, monkeypatch, capsys, where, lang, code):
    monkeypatch.chdir(world)
    if lang == "python":
        exec(compile(code, where, "exec"), {})
        return
    for line in code.splitlines():
        command = line.split(" #")[0].strip()
        if not command:
            continue
        argv = shlex.split(command)
        assert argv[0] == "sae-scaling", f"{where}: only sae-scaling commands run here: {line}"
        assert main(argv[1:]) == 0, (where, line, capsys.readouterr().err)
