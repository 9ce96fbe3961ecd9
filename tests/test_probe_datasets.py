"""User-supplied probe tasks (Gao et al. 2024, §4): reading, labelling, validation, and a planted latent."""
import csv
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_downstream import evaluator, held_out

from sae_core import SAE
from sae_core.errors import ConfigError, DataError
from sae_core.evaluation.probe import evaluate_probes
from sae_core.evaluation.probe_datasets import ProbeTaskSpec, load_task
from sae_core.evaluation.run import EvalConfig
from sae_core.lm import load_model

WORDS = ["Sparse", " autoencoders", " decompose", " activations", " residual", " layers", " loss"]
MARK = " stream"  # one token of the tiny tokenizer: the planted latent fires on it alone


@pytest.fixture(scope="module")
def lm(tiny_models):
    return load_model(str(tiny_models["gpt2"]))


def sequence_rows(n=80, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = ["Sparse"] + [rng.choice(WORDS[1:]) for _ in range(rng.randint(2, 5))]
        if i % 2:
            words.insert(rng.randint(1, len(words)), MARK)
        rows.append({"text": "".join(words), "label": i % 2})
    return rows


def write(rows, path):
    """rows as a .jsonl, .csv (non-text cells as JSON) or .parquet file, or a save_to_disk folder."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=list(rows[0]))
            out.writeheader()
            out.writerows([{k: v if k == "text" else json.dumps(v) for k, v in r.items()} for r in rows])
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


def spec(path, level="sequence", **kw):
    key = "path" if path.endswith((".jsonl", ".csv", ".parquet")) else "dataset"
    return ProbeTaskSpec(name="t", level=level, **{key: path}, **kw)


def test_token_spans_label_the_overlapping_tokens(lm, tmp_path):
    # tokens: t(0,1) he(1,3) Ġresidual(3,12) Ġstream(12,19) Ġcar(19,23) ries(23,27) Ġlayers(27,34)
    rows = [{"text": "the residual stream carries layers", "label": [[4, 12], [24, 27]]}]
    task = load_task(spec(write(rows, tmp_path / "s.jsonl"), "token"), lm.tokenizer, context_length=16)
    assert task.labels["t"].tolist() == [0, 0, 1, 0, 0, 1, 0]
    short = load_task(spec(write(rows, tmp_path / "s.jsonl"), "token"), lm.tokenizer, context_length=5)
    assert short.labels["t"].tolist() == [0, 0, 1, 0, 0]  # truncated to the context length
    dropped = load_task(spec(write(rows, tmp_path / "s.jsonl"), "token"), lm.tokenizer, 16, drop_first=2)
    assert dropped.labels["t"].tolist() == [1, 0, 0, 1, 0]


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_every_format_gives_the_same_labels(lm, tmp_path, level):
    rows = sequence_rows(40)
    if level == "token":
        rows = [{"text": r["text"], "label": [[0, 6]] if r["label"] else []} for r in rows]
    got = [load_task(spec(write(rows, tmp_path / name), level), lm.tokenizer, 16, drop_first=0)
           for name in ("t.jsonl", "t.csv", "t.parquet", "saved")]
    for task in got[1:]:
        assert torch.equal(task.tokens, got[0].tokens) and torch.equal(task.keep, got[0].keep)
        assert torch.equal(task.labels["t"], got[0].labels["t"])
    assert 0.05 < float(got[0].labels["t"].mean()) < 0.95


def planted_sae(lm, latent=3, n=8):
    """Latent `latent` reads the direction the marked token's embedding was set to, with a threshold no other
    token reaches (resid_pre of layer 0 = token + position embedding)."""
    mark = lm.tokenizer(MARK)["input_ids"]
    assert len(mark) == 1
    u = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(1)), dim=0)
    with torch.no_grad():
        lm.model.transformer.wte.weight[mark[0]] = u
    sae = SAE({"arch": "topk", "d_in": 32, "n_latents": n, "k": 2, "normalization": "none"}, init_seed=0)
    with torch.no_grad():
        sae.net.W_enc[latent] = 10 * u
        sae.net.b_enc[latent] = -5.0
        sae.net.b_pre.zero_()
    return sae


def test_planted_latent_solves_the_sequence_task(tiny_models, tmp_path):
    lm = load_model(str(tiny_models["gpt2"]))  # its own copy: the marked token's embedding is changed
    sae = planted_sae(lm)
    tokens, excluded = held_out(lm)
    ev = evaluator(lm, tokens, excluded, site="resid_pre", layers=[0])
    task = spec(write(sequence_rows(), tmp_path / "x.jsonl"))
    metrics, rows = evaluate_probes(sae, ev, 0, 256, [task])
    user = [r for r in rows if r["source"] != "builtin"]
    assert len(user) == 1 and user[0]["level"] == "sequence" and user[0]["source"].endswith("x.jsonl")
    assert user[0]["best_latent"] == 3 and user[0]["loss"] < 0.05 and user[0]["base_rate"] == 0.5
    assert {r["source"] for r in rows} == {"builtin", user[0]["source"]}
    assert metrics["probe_loss"] == pytest.approx(np.mean([r["loss"] for r in rows]))
    assert metrics["probe_loss_baseline"] == pytest.approx(np.mean([r["baseline"] for r in rows]))
    only, rows = evaluate_probes(sae, ev, 0, 256, [task], builtin=False)
    assert [r["task"] for r in rows] == ["t"] and only["probe_loss"] == rows[0]["loss"]
    spans = [{"text": r["text"], "label": [[r["text"].find(MARK), r["text"].find(MARK) + len(MARK)]] if r["label"]
              else []} for r in sequence_rows()]
    tokens_task = ProbeTaskSpec(name="mark", level="token", path=write(spans, tmp_path / "spans.jsonl"))
    _, rows = evaluate_probes(sae, ev, 0, 256, [tokens_task], builtin=False)
    assert rows[0]["level"] == "token" and rows[0]["best_latent"] == 3 and rows[0]["loss"] < 0.05


def test_bad_inputs_name_the_file_and_key(lm, tmp_path):
    good = sequence_rows()
    cases = {
        "missing file": (str(tmp_path / "none.jsonl"), {}, ".path"),
        "missing column": (write(good, tmp_path / "a.jsonl"), {"text_column": "body"}, ".text_column"),
        "label 2": (write([{**r, "label": 2 if i == 3 else r["label"]} for i, r in enumerate(good)],
                          tmp_path / "b.csv"), {}, ".label_column"),
        "too rare": (write([{"text": r["text"], "label": int(i == 0)} for i, r in enumerate(sequence_rows(200))],
                           tmp_path / "c.parquet"), {}, ".label_column"),
    }
    for case, (path, kw, key) in cases.items():
        with pytest.raises(DataError) as err:
            load_task(spec(path, **kw), lm.tokenizer, 16)
        message = str(err.value)
        assert path in message and "eval.probe_tasks[t]" + key in message and "allowed" in message, (case, message)
    with pytest.raises(DataError, match="label 2; allowed: 0, 1, true, false"):
        load_task(spec(cases["label 2"][0]), lm.tokenizer, 16)


def test_probe_tasks_in_the_eval_config(tmp_path):
    from sae_core.errors import validate
    cfg = validate(EvalConfig, {"probe_tasks": [{"name": "a", "path": "a.jsonl", "level": "token"}]})
    assert cfg.probe_tasks[0].max_examples == 2048 and cfg.probe_builtin
    for bad in ({"name": "a", "path": "a.jsonl", "level": "token", "colour": 1},
                {"name": "a", "level": "token"},
                {"name": "a", "path": "a.jsonl", "dataset": "d", "level": "token"},
                {"name": "a", "path": "a.jsonl", "level": "word"}):
        with pytest.raises(ConfigError, match="probe_tasks"):
            validate(EvalConfig, {"probe_tasks": [bad]}, prefix="eval")
    with pytest.raises(ConfigError, match="unique"):
        validate(EvalConfig, {"probe_tasks": [{"name": "a", "path": "a.jsonl", "level": "token"}] * 2})


def test_a_sweep_with_a_bad_task_file_fails_before_training_and_a_changed_file_is_a_new_run(tmp_path):
    import yaml

    from orchestrator.plan import plan_sweep

    task = tmp_path / "task.jsonl"
    sweep = {"name": "p", "model": "embedded", "hook": {"site": "resid_post", "layers": [1]},
             "data": {"text": {"embedded": True}, "train_tokens": 1000, "eval_tokens": 256},
             "grid": {"arch": ["topk"], "n_latents": [64], "k": [4]},
             "eval": {"probe": True, "probe_tasks": [{"name": "t", "path": str(task), "level": "sequence"}]}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(sweep))
    with pytest.raises(DataError) as err:
        plan_sweep(path, tmp_path / "results")
    assert str(err.value).startswith(f"{path}: eval.probe_tasks[t].path ({task})") and "no such file" in str(err.value)
    assert not (tmp_path / "results").exists()
    write(sequence_rows(), task)
    first = plan_sweep(path, tmp_path / "results").runs[0]
    write(sequence_rows(seed=1), task)
    second = plan_sweep(path, tmp_path / "results").runs[0]
    assert first.run_id != second.run_id and first.settings == second.settings
    assert "eval.probe_tasks[t]" in second.inputs
