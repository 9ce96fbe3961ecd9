"""Bad inputs are refused with one message naming the file and what is wrong, never blamed on training: nan or
inf in activation files (named by file and row before any training), from a model while building the
activation cache, or in a training batch (a failed run, not a diverged one); empty, truncated or garbage
activation files, SAE folders and trainer checkpoints (a broken checkpoint is moved aside and the run
starts from scratch)."""
from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import yaml

from orchestrator.cli import main
from orchestrator.plan import plan_runs
from orchestrator.spec import parse_spec
from orchestrator.worker import train_pack
from sae_core import SAE, Trainer
from sae_core.activation_cache import ActivationCache, CacheSpec
from sae_core.checkpoint import MANIFEST, SHARD_DIR
from sae_core.errors import ConfigError, DataError
from sae_core.formats import export
from sae_core.lm import load_model
from sae_core.sources import ActivationSource, FileSource, SyntheticSource

ROWS, D, BAD_ROW, BAD_COL = 300, 6, 217, 4
SMALL = SyntheticSource(d_in=16, n_features=64, active_per_vector=3, noise_std=0.01, seed=0, n_eval=512)


def error_of(call) -> str:
    with pytest.raises(DataError) as info:
        call()
    return str(info.value)


def rows_with(value: float, dtype=np.float32) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((ROWS, D)).astype(dtype)
    x[BAD_ROW, BAD_COL] = value
    return x


def write(path, fmt: str, x: np.ndarray) -> None:
    if fmt == "npy":
        np.save(path, x)
    elif fmt in ("f16", "f32"):
        safetensors.numpy.save_file({"activations": x.astype(np.float16 if fmt == "f16" else np.float32)}, str(path))
    elif fmt == "bf16":
        safetensors.torch.save_file({"activations": torch.from_numpy(x).bfloat16()}, str(path))
    elif fmt == "parquet":
        pq.write_table(pa.table({"v": pa.array(list(x), pa.list_(pa.float32()))}), path)


# --- 1. nan or inf in activation files: named by file and row, before any training ----------------------------
@pytest.mark.parametrize("fmt, suffix", [("npy", ".npy"), ("f16", ".safetensors"), ("bf16", ".safetensors"),
                                         ("f32", ".safetensors"), ("parquet", ".parquet")])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_nonfinite_value_is_named_by_file_row_and_column(tmp_path, fmt, suffix, value):
    clean, bad = tmp_path / f"clean{suffix}", tmp_path / f"bad{suffix}"
    write(clean, fmt, rows_with(1.0))
    write(bad, fmt, rows_with(value))
    FileSource(clean, n_eval=10).check_finite(chunk_bytes=64)  # chunks of a few rows: the bad one is not first
    source = FileSource([clean, bad], n_eval=10)  # opening reads headers only; the scan is separate
    msg = error_of(lambda: source.check_finite(chunk_bytes=64))
    assert str(bad) in msg and f"row {BAD_ROW} (column {BAD_COL})" in msg and str(value) in msg


def test_held_out_files_are_scanned_too(tmp_path):
    np.save(tmp_path / "train.npy", rows_with(1.0))
    np.save(tmp_path / "eval.npy", rows_with(float("nan")))
    msg = error_of(FileSource(tmp_path / "train.npy", eval_paths=tmp_path / "eval.npy").check_finite)
    assert "eval.npy" in msg and f"row {BAD_ROW}" in msg


def test_run_refuses_nan_files_before_any_work_and_the_dry_run_does_not_read_them(tmp_path, capsys):
    np.save(tmp_path / "acts.npy", rows_with(float("nan")))
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "grid": {"arch": ["topk"], "n_latents": [16], "k": [2]},
                                     "data": {"activations": str(tmp_path / "acts.npy"), "train_tokens": 100,
                                              "eval_tokens": 10}}))
    results = tmp_path / "results"
    assert main(["run", str(sweep), "--dry-run", "--results", str(results)]) == 0
    capsys.readouterr()
    assert main(["run", str(sweep), "--results", str(results)]) == 2
    out, err = capsys.readouterr()
    assert "acts.npy" in err and f"row {BAD_ROW}" in err and "nan" in err and "Traceback" not in err
    assert "checking data.activations for nan and inf" in out
    assert not results.exists()  # refused before Ray starts or anything is written


# --- 2. unreadable activation files: one line naming the file ---------------------------------------------------
def test_empty_truncated_and_garbage_npy_files_are_named(tmp_path):
    (tmp_path / "empty.npy").write_bytes(b"")
    assert "empty.npy" in error_of(lambda: FileSource(tmp_path / "empty.npy", n_eval=1))
    np.save(tmp_path / "cut.npy", rows_with(1.0))
    raw = (tmp_path / "cut.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(raw[:len(raw) // 2])
    assert "cut.npy" in error_of(lambda: FileSource(tmp_path / "cut.npy", n_eval=1))
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage" * 7)
    assert "junk.npy" in error_of(lambda: FileSource(tmp_path / "junk.npy", n_eval=1))
    header = json.dumps({"activations": 5}).encode()
    (tmp_path / "odd.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    assert "odd.safetensors" in error_of(lambda: FileSource(tmp_path / "odd.safetensors", n_eval=1))


# --- 3. a model giving nan or inf while the activation cache is built ------------------------------------------
def cache_spec(**kw) -> CacheSpec:
    base = dict(model="tiny-gpt2", model_dtype="float32", site="resid_post", layers=(2, 0), text_key="test",
                context_length=16, drop_first=0, prepend_bos=False, train_tokens=500, eval_tokens=150,
                store_dtype="float32")
    return CacheSpec(**{**base, **kw})


@pytest.mark.parametrize("embedding, spec, advice", [
    (float("inf"), {}, "check its weights"),
    (float("inf"), {"model_dtype": "float16"}, "data.model_dtype: float32"),
    (1e6, {"store_dtype": "float16"}, "data.cache_dtype: float32"),  # finite in float32, inf in float16
])
def test_the_cache_build_refuses_nonfinite_activations_naming_model_layer_and_row(tmp_path, tiny_models, embedding,
                                                                                 spec, advice):
    lm = load_model(str(tiny_models["gpt2"]))
    rows = np.random.default_rng(0).integers(1, len(lm.tokenizer) - 1, size=(60, 16)).astype(np.int32)
    rows[rows == lm.tokenizer.eos_token_id] = 1
    token = int(rows[7, 9])
    first_row = np.argwhere(rows == token)[0][0]  # its nan fills that whole row: masked attention multiplies by 0
    with torch.no_grad():
        lm.model.transformer.wte.weight[token] = embedding
    cache = ActivationCache(tmp_path, cache_spec(**spec))
    msg = error_of(lambda: cache.ensure(lambda: lm, lambda _: (rows, np.zeros_like(rows, bool))))
    assert "tiny-gpt2" in msg and "layer 0" in msg and advice in msg
    assert f"token row {first_row}, position " in msg
    assert not cache.is_complete() and not list(cache.dir.rglob("shard_*.safetensors"))


def test_cache_layers_are_stored_under_their_own_names_whatever_their_order(tmp_path, tiny_models):
    from sae_core.lm import ActivationExtractor

    lm = load_model(str(tiny_models["gpt2"]))
    rows = np.random.default_rng(1).integers(1, len(lm.tokenizer) - 1, size=(60, 16)).astype(np.int32)
    rows[rows == lm.tokenizer.eos_token_id] = 1
    cache = ActivationCache(tmp_path, cache_spec()).ensure(lambda: lm, lambda _: (rows, np.zeros_like(rows, bool)))
    acts = ActivationExtractor(lm.model, "resid_post", [2])(torch.from_numpy(rows.astype(np.int64)))[0]
    held_out = cache.layer_source(2).eval_set()
    assert torch.equal(held_out, acts.reshape(-1, acts.shape[-1])[:len(held_out)])


# --- 4. a non-finite training batch: a failed run naming the step, not a diverged one --------------------------
class NanAt(ActivationSource):
    """SMALL with a nan in row 3 of the training batch of one step (or of the held-out set: step None)."""
    d_in = 16

    def __init__(self, step: int | None):
        self.step = step

    def train_batch(self, step, batch_size):
        x = SMALL.train_batch(step, batch_size).clone()
        if step == self.step:
            x[3, 5] = float("nan")
        return x

    def eval_set(self):
        x = SMALL.eval_set().clone()
        if self.step is None:
            x[3, 5] = float("nan")
        return x


TOPK = {"arch": "topk", "d_in": 16, "n_latents": 64, "k": 4, "normalization": "none"}
TRAIN = {"train_tokens": 256 * 12, "batch_size": 256, "lr": 1e-3, "init_samples": 256}


@pytest.mark.parametrize("step, named", [(6, "the training batch of step 6"), (0, "the init sample"),
                                         (None, "the held-out eval set")])
def test_a_nonfinite_batch_is_a_data_error_naming_the_step(tmp_path, step, named):
    msg = error_of(lambda: Trainer(TOPK, TRAIN, NanAt(step), tmp_path).run())
    assert named in msg and "row 3" in msg and "nan or inf" in msg


def test_the_worker_records_a_nonfinite_batch_as_a_failed_run_with_the_message(tmp_path, monkeypatch):
    spec = parse_spec({"name": "nan", "data": {"synthetic": {"d_in": 16, "n_features": 64}, "train_tokens": 2048,
                                               "eval_tokens": 512},
                       "grid": {"arch": ["topk"], "n_latents": [32], "k": [4]},
                       "train": {"batch_size": 256, "init_samples": 256}})
    clean = SyntheticSource.train_batch

    def poisoned(self, step, batch_size):
        x = clean(self, step, batch_size)
        if step == 2:
            x[0, 0] = float("inf")
        return x

    monkeypatch.setattr(SyntheticSource, "train_batch", poisoned)
    (run,) = plan_runs(spec, 16, [None])
    assert train_pack(spec.model_dump(mode="json", exclude_unset=True), [asdict(run)], str(tmp_path)) == \
        {run.run_id: "failed"}  # failed rows are retried by the next `run`; diverged ones are not
    row = pd.read_parquet(tmp_path / "nan" / "runs" / f"{run.run_id}.parquet").iloc[0]
    assert row["status"] == "failed" and "step 2" in row["error"] and "Traceback" not in row["error"]


# --- 5. broken SAE folders: SAE.load and export name the file and what to do ----------------------------------
def saved_sae(folder):
    SAE({"arch": "topk", "d_in": 12, "n_latents": 40, "k": 5, "normalization": "none"}, init_seed=0).save(folder)
    return folder


def test_garbage_config_and_truncated_weights_are_named_by_load_and_export(tmp_path, capsys):
    ok = saved_sae(tmp_path / "ok")
    assert (export(ok, "saelens", tmp_path / "out-ok") / "cfg.json").is_file()
    cases = {"config.json": lambda p: p.write_bytes(b"\x00{garbage"),
             "sae.safetensors": lambda p: p.write_bytes(p.read_bytes()[:100])}
    for name, damage in cases.items():
        folder = saved_sae(tmp_path / name)
        damage(folder / name)
        for call in (lambda f=folder: SAE.load(f), lambda f=folder: export(f, "saelens", tmp_path / "out")):
            msg = error_of(call)
            assert str(folder / name) in msg and "re-train the run" in msg
        assert main(["export", str(folder), "--format", "sparsify", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert str(folder / name) in err and "Traceback" not in err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text(json.dumps({"sae": ["topk"]}))
    (tmp_path / "junk" / "sae.safetensors").write_bytes(b"\xff" * 64)
    msg = error_of(lambda: SAE.load(tmp_path / "junk"))
    assert "config.json" in msg and "'sae'" in msg
    assert not (tmp_path / "out").exists()


def test_nan_weights_are_named_not_blamed_on_the_decoder_norm(tmp_path):
    folder = saved_sae(tmp_path / "run")
    weights = safetensors.torch.load_file(folder / "sae.safetensors")
    weights["W_dec"][3, 1] = float("nan")
    safetensors.torch.save_file(weights, folder / "sae.safetensors")
    for call in (lambda: SAE.load(folder), lambda: export(folder, "saelens", tmp_path / "out")):
        msg = error_of(call)
        assert "sae.safetensors" in msg and "'W_dec'" in msg and "nan" in msg and "unit-norm" not in msg


def test_weights_that_do_not_fit_their_config_are_named(tmp_path):
    folder = saved_sae(tmp_path / "run")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["sae"]["n_latents"] = 41
    (folder / "config.json").write_text(json.dumps(cfg))
    msg = error_of(lambda: SAE.load(folder))
    assert "sae.safetensors" in msg and "W_enc" in msg


def exported_saelens(tmp_path):
    return export(saved_sae(tmp_path / "run"), "saelens", tmp_path / "sl")


@pytest.mark.parametrize("change, named", [
    (lambda c: c.pop("d_in"), "d_in: missing; allowed: an integer >= 1"),
    (lambda c: c.update(d_in="12"), "d_in: got '12'; allowed: an integer >= 1"),
    (lambda c: c.pop("d_sae"), "d_sae: missing"),
    (lambda c: c.pop("k"), "k: missing"),
    (lambda c: c.update(metadata="gpt2"), "metadata: got 'gpt2'"),
])
def test_a_saelens_config_missing_or_mistyping_a_key_names_it(tmp_path, change, named):
    folder = exported_saelens(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    change(cfg)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    msg = error_of(lambda: SAE.load(folder))
    assert str(folder / "cfg.json") in msg and named in msg


def test_peer_folders_with_missing_tensors_or_keys_are_named(tmp_path):
    folder = exported_saelens(tmp_path)
    weights = safetensors.torch.load_file(folder / "sae_weights.safetensors")
    del weights["b_dec"]
    safetensors.torch.save_file(weights, folder / "sae_weights.safetensors")
    msg = error_of(lambda: SAE.load(folder))
    assert "sae_weights.safetensors" in msg and "b_dec missing" in msg and "re-export" in msg
    sparsify = export(saved_sae(tmp_path / "run2"), "sparsify", tmp_path / "sp")
    cfg = json.loads((sparsify / "cfg.json").read_text())
    del cfg["k"]
    (sparsify / "cfg.json").write_text(json.dumps(cfg))
    msg = error_of(lambda: SAE.load(sparsify))
    assert str(sparsify / "cfg.json") in msg and "k: missing" in msg


# --- 6. a broken trainer checkpoint: moved aside, the run starts from scratch ----------------------------------
@pytest.mark.parametrize("damage", ["truncated shard", "garbage manifest"])
def test_a_broken_checkpoint_is_moved_aside_and_the_run_starts_from_scratch(tmp_path, capsys, damage):
    fresh = Trainer(TOPK, TRAIN, SMALL, tmp_path / "fresh").run()
    run = tmp_path / "run"
    assert Trainer(TOPK, TRAIN, SMALL, run).run(max_steps=3).status == "stopped"
    for suffix in (".broken", ".1.broken"):  # broken twice: the first one's files are kept
        broken = next((run / SHARD_DIR).rglob("*.safetensors")) if damage == "truncated shard" else run / MANIFEST
        broken.write_bytes(broken.read_bytes()[:50] if damage == "truncated shard" else b"\x00garbage")
        kept, where = broken.read_bytes(), broken.relative_to(run).parts
        result = Trainer(TOPK, TRAIN, SMALL, run).run()
        assert result.status == "ok" and result.metrics == fresh.metrics  # from scratch, not from a checkpoint
        warning = capsys.readouterr().err.strip().splitlines()
        assert len(warning) == 1 and "unreadable trainer checkpoint" in warning[0] and "from scratch" in warning[0]
        assert run.joinpath(where[0] + suffix, *where[1:]).read_bytes() == kept  # moved aside, never deleted


def test_a_checkpoint_of_another_config_is_refused_not_moved_aside(tmp_path):
    Trainer(TOPK, TRAIN, SMALL, tmp_path).run(max_steps=1)
    with pytest.raises(ConfigError, match="different config"):
        Trainer({**TOPK, "n_latents": 32}, TRAIN, SMALL, tmp_path).run()  # other shapes too: not 'unreadable'
    assert (tmp_path / MANIFEST).is_file() and not list(tmp_path.glob("*.broken"))
