import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from sae_core.errors import ConfigError, DataError
from sae_core.sources import ActivationSource, FileSource, SyntheticSource, mmcs

# ---------------------------------------------------------------- synthetic

def test_synthetic_batches_are_pure_functions_of_step():
    src = SyntheticSource(d_in=32, n_features=128, noise_std=0.01, seed=3)
    assert isinstance(src, ActivationSource)
    a = src.train_batch(5, 64)
    assert a.shape == (64, 32) and a.dtype == torch.float32
    assert torch.equal(a, SyntheticSource(d_in=32, n_features=128, noise_std=0.01, seed=3).train_batch(5, 64))
    assert torch.equal(a, src.train_batch(5, 64))
    assert not torch.allclose(a, src.train_batch(6, 64))
    assert not torch.allclose(a, SyntheticSource(d_in=32, n_features=128, noise_std=0.01, seed=4).train_batch(5, 64))
    assert torch.equal(src.sample(64), src.train_batch(0, 64))


def test_synthetic_eval_is_cached_and_held_out():
    src = SyntheticSource(d_in=16, n_features=64, active_per_vector=3, n_eval=512)
    ev = src.eval_set()
    assert ev.shape == (512, 16) and ev is src.eval_set()
    train = {r.tobytes() for step in range(4) for r in src.train_batch(step, 512).numpy()}
    nonzero = ev[ev.abs().sum(dim=1) > 0]  # vectors with no active feature (about e^-3 of them) coincide
    assert len(nonzero) > 400 and not any(r.tobytes() in train for r in nonzero.numpy())


def test_synthetic_features_are_unit_norm():
    src = SyntheticSource(d_in=48, n_features=300)
    assert src.features.shape == (300, 48) and src.features.dtype == torch.float32
    torch.testing.assert_close(src.features.norm(dim=1), torch.ones(300))


@pytest.mark.parametrize("frequency", ["uniform", "power_law"])
def test_synthetic_mean_active_count(frequency):
    src = SyntheticSource(d_in=16, n_features=512, active_per_vector=8, frequency=frequency)
    _, idx, coef = src.train_batch_with_codes(0, 8192)
    counts = (coef > 0).sum(dim=1).float()
    assert abs(counts.mean().item() - 8) < 0.15 * 8
    assert counts.std() > 1  # the active count varies from vector to vector
    live = idx[coef > 0]
    fired = torch.bincount(live, minlength=512).float() / 8192
    if frequency == "power_law":
        assert fired[:10].mean() > 10 * fired[-100:].mean()
    else:
        assert fired[:256].mean().item() == pytest.approx(fired[256:].mean().item(), rel=0.1)
    torch.testing.assert_close(fired, src.active_probs.float(), atol=0.02, rtol=0.1)


def _active_matrix(src, n):
    _, idx, coef = src.train_batch_with_codes(0, n)
    active = torch.zeros(n, src.n_features)
    active.scatter_add_(1, idx, (coef > 0).float())
    assert active.max() == 1  # live indices within a row are distinct
    return active.bool()


def test_synthetic_correlated_groups_coactivate():
    src = SyntheticSource(d_in=16, n_features=64, active_per_vector=4, correlated_group_size=4,
                          group_coactivation=0.8)
    active = _active_matrix(src, 20000)
    assert abs(active.sum(dim=1).float().mean().item() - 4) < 0.15 * 4

    def both(i, j):
        return (active[:, i] & active[:, j]).float().mean().item()

    same = np.mean([both(g * 4, g * 4 + 1) for g in range(16)])
    different = np.mean([both(g * 4, ((g + 1) % 16) * 4 + 1) for g in range(16)])
    assert same > 3 * different

    independent = _active_matrix(SyntheticSource(d_in=16, n_features=64, active_per_vector=4), 20000)
    same_independent = np.mean([(independent[:, g * 4] & independent[:, g * 4 + 1]).float().mean().item()
                                for g in range(16)])
    assert same > 3 * same_independent


def test_synthetic_noiseless_vectors_lie_in_span_of_active_features():
    src = SyntheticSource(d_in=32, n_features=40, active_per_vector=3, magnitude="constant")
    x, idx, coef = src.train_batch_with_codes(0, 50)
    for row in range(50):
        live = idx[row][coef[row] > 0]
        assert torch.all(coef[row][coef[row] > 0] == 1)
        basis = src.features[live].double().T
        solution = torch.linalg.lstsq(basis, x[row].double()).solution
        torch.testing.assert_close(basis @ solution, x[row].double(), atol=1e-5, rtol=0)
        torch.testing.assert_close(solution, torch.ones(len(live), dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("magnitude", ["exponential", "uniform", "constant", "lognormal"])
def test_synthetic_magnitudes_positive_mean_one(magnitude):
    src = SyntheticSource(d_in=8, n_features=64, magnitude=magnitude)
    _, _, coef = src.train_batch_with_codes(0, 4096)
    live = coef[coef != 0]
    assert live.min() > 0 and live.mean().item() == pytest.approx(1.0, abs=0.05)


def test_synthetic_noise_has_requested_std():
    clean = SyntheticSource(d_in=64, n_features=128, seed=1)
    noisy = SyntheticSource(d_in=64, n_features=128, seed=1, noise_std=0.1)
    x, idx, coef = noisy.train_batch_with_codes(2, 2048)
    signal = torch.nn.functional.embedding_bag(idx, clean.features, per_sample_weights=coef, mode="sum")
    assert (x - signal).std().item() == pytest.approx(0.1, rel=0.05)


def test_mmcs():
    features = SyntheticSource(d_in=64, n_features=256).features
    assert mmcs(features, features) == pytest.approx(1.0, abs=1e-6)
    assert mmcs(torch.randn(512, 64), features) < 0.5
    perturbed = 3 * features[torch.randperm(256)] + 0.01 * torch.randn(256, 64)
    assert mmcs(torch.cat([perturbed, torch.randn(100, 64)]), features) > 0.95
    assert mmcs(features[:128], features) < 0.8  # half the features have no match


@pytest.mark.parametrize("kwargs, name", [
    (dict(active_per_vector=600, n_features=512), "active_per_vector"),
    (dict(active_per_vector=0), "active_per_vector"),
    (dict(d_in=0), "d_in"),
    (dict(n_features=0), "n_features"),
    (dict(noise_std=-0.1), "noise_std"),
    (dict(magnitude="gaussian"), "magnitude"),
    (dict(frequency="zipf"), "frequency"),
    (dict(frequency_exponent=-1.0), "frequency_exponent"),
    (dict(correlated_group_size=0), "correlated_group_size"),
    (dict(group_coactivation=1.5), "group_coactivation"),
    (dict(seed=-1), "seed"),
    (dict(n_eval=0), "n_eval"),
])
def test_synthetic_bad_arguments(kwargs, name):
    with pytest.raises(ConfigError, match=name):
        SyntheticSource(**kwargs)


# ---------------------------------------------------------------- files

def _rows(n, d, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _sorted_rows(x):
    x = np.asarray(x, dtype=np.float32)
    return x[np.lexsort(x.T[::-1])]


def _all_training_rows(src, batch_size=37):
    steps = -(-src.n_train // batch_size)
    return torch.cat([src.train_batch(step, batch_size) for step in range(steps)])[: src.n_train]


def _check_round_trip(src, expected):
    ev, train = src.eval_set().numpy(), _all_training_rows(src).numpy()
    assert ev.dtype == np.float32 and train.dtype == np.float32
    assert len(ev) == src.n_rows - src.n_train and src.n_rows == len(expected)
    np.testing.assert_array_equal(_sorted_rows(np.concatenate([ev, train])), _sorted_rows(expected))
    ev_set = {r.tobytes() for r in ev}
    assert not any(r.tobytes() in ev_set for r in train)


def _write(path, fmt, x):
    if fmt == "npy":
        np.save(path, x)
    elif fmt == "f32":
        safetensors.numpy.save_file({"acts": x}, str(path), metadata={"model": "test"})
    elif fmt == "f16":
        safetensors.numpy.save_file({"activations": x.astype(np.float16), "other": x[:2]}, str(path))
    elif fmt == "bf16":
        safetensors.torch.save_file({"activations": torch.from_numpy(x).bfloat16()}, str(path))
    elif fmt == "parquet_list":
        pq.write_table(pa.table({"v": pa.array(list(x), pa.list_(pa.float32()))}), path)
    elif fmt == "parquet_fixed":
        pq.write_table(pa.table({"v": pa.FixedSizeListArray.from_arrays(x.reshape(-1), x.shape[1])}), path)
    elif fmt == "parquet_columns":
        pq.write_table(pa.table({f"d{j}": x[:, j].astype(np.float64) for j in range(x.shape[1])}), path)


@pytest.mark.parametrize("fmt, suffix, exact", [
    ("npy", ".npy", np.float32), ("f32", ".safetensors", np.float32), ("f16", ".safetensors", np.float16),
    ("bf16", ".safetensors", None), ("parquet_list", ".parquet", np.float32),
    ("parquet_fixed", ".parquet", np.float32), ("parquet_columns", ".parquet", np.float32),
])
def test_files_round_trip(tmp_path, fmt, suffix, exact):
    x = _rows(300, 6)
    path = tmp_path / f"acts{suffix}"
    _write(path, fmt, x)
    src = FileSource(path, n_eval=50)
    assert src.d_in == 6 and src.n_rows == 300 and src.n_train == 250
    if exact is None:
        expected = torch.from_numpy(x).bfloat16().float().numpy()
    else:
        expected = x.astype(exact).astype(np.float32)
    _check_round_trip(src, expected)


def test_files_glob_concatenates_in_sorted_order(tmp_path):
    a, b = _rows(120, 5, seed=1), _rows(80, 5, seed=2)
    np.save(tmp_path / "b.npy", b)
    np.save(tmp_path / "a.npy", a)
    src = FileSource(str(tmp_path / "*.npy"), n_eval=20)
    assert src.n_rows == 200
    _check_round_trip(src, np.concatenate([a, b]))
    listed = FileSource([tmp_path / "a.npy", tmp_path / "b.npy"], n_eval=20)
    assert torch.equal(listed.eval_set(), src.eval_set())
    assert torch.equal(listed.train_batch(3, 16), src.train_batch(3, 16))
    # eval rows come in file order, so a row of a.npy precedes any row of b.npy
    rows_of_a = {r.tobytes() for r in a}
    in_a = [r.tobytes() in rows_of_a for r in src.eval_set().numpy()]
    assert in_a == sorted(in_a, reverse=True)


def test_files_epochs_cover_training_rows_once_and_reshuffle(tmp_path):
    x = np.arange(103 * 2, dtype=np.float32).reshape(103, 2)  # unique rows
    np.save(tmp_path / "x.npy", x)
    src = FileSource(tmp_path / "x.npy", n_eval=3, seed=7)
    assert src.n_train == 100
    epoch0 = torch.cat([src.train_batch(step, 10) for step in range(10)])
    epoch1 = torch.cat([src.train_batch(step, 10) for step in range(10, 20)])
    for epoch in (epoch0, epoch1):
        assert len({tuple(r) for r in epoch.tolist()}) == 100
    assert not torch.equal(epoch0, epoch1)
    assert {tuple(r) for r in epoch0.tolist()} == {tuple(r) for r in epoch1.tolist()}
    # a batch straddling the epoch boundary is the tail of epoch 0 followed by the head of epoch 1
    straddle = src.train_batch(3, 30)
    assert torch.equal(straddle, torch.cat([epoch0[90:], epoch1[:20]]))
    # a batch larger than an epoch still follows the stream
    assert torch.equal(src.train_batch(0, 250)[:200], torch.cat([epoch0, epoch1]))


def test_files_determinism_and_seed_keeps_eval(tmp_path):
    np.save(tmp_path / "x.npy", _rows(500, 4))
    src = FileSource(tmp_path / "x.npy", n_eval=64, seed=0)
    again = FileSource(tmp_path / "x.npy", n_eval=64, seed=0)
    other = FileSource(tmp_path / "x.npy", n_eval=64, seed=1)
    assert torch.equal(src.train_batch(9, 32), again.train_batch(9, 32))
    assert torch.equal(src.train_batch(9, 32), src.train_batch(9, 32))
    assert not torch.equal(src.train_batch(9, 32), other.train_batch(9, 32))
    assert torch.equal(src.eval_set(), other.eval_set()) and src.eval_set() is src.eval_set()
    assert torch.equal(src.sample(32), src.train_batch(0, 32))


def _error(call) -> str:
    with pytest.raises(DataError) as info:
        call()
    return str(info.value)


def test_files_bad_inputs(tmp_path):
    msg = _error(lambda: FileSource(tmp_path / "missing.npy"))
    assert "missing.npy" in msg and "not found" in msg
    msg = _error(lambda: FileSource(str(tmp_path / "none_*.npy")))
    assert "none_*.npy" in msg and "matched no files" in msg

    (tmp_path / "acts.txt").write_text("1 2 3\n")
    msg = _error(lambda: FileSource(tmp_path / "acts.txt"))
    assert "acts.txt" in msg and ".txt" in msg and ".npy" in msg

    np.save(tmp_path / "cube.npy", np.zeros((10, 4, 2), np.float32))
    msg = _error(lambda: FileSource(tmp_path / "cube.npy", n_eval=1))
    assert "cube.npy" in msg and "(10, 4, 2)" in msg

    np.save(tmp_path / "ints.npy", np.zeros((10, 4), np.int32))
    msg = _error(lambda: FileSource(tmp_path / "ints.npy", n_eval=1))
    assert "ints.npy" in msg and "int32" in msg and "float32" in msg

    safetensors.numpy.save_file({"x": np.zeros((10, 4), np.int32)}, str(tmp_path / "ints.safetensors"))
    msg = _error(lambda: FileSource(tmp_path / "ints.safetensors", n_eval=1))
    assert "ints.safetensors" in msg and "I32" in msg and "BF16" in msg

    pq.write_table(pa.table({"a": [1, 2, 3], "b": [1.0, 2.0, 3.0]}), tmp_path / "ints.parquet")
    msg = _error(lambda: FileSource(tmp_path / "ints.parquet", n_eval=1))
    assert "ints.parquet" in msg and "int64" in msg

    pq.write_table(pa.table({"v": pa.array([[1.0, 2.0], [3.0]])}), tmp_path / "ragged.parquet")
    msg = _error(lambda: FileSource(tmp_path / "ragged.parquet", n_eval=1))
    assert "ragged.parquet" in msg and "same length" in msg

    np.save(tmp_path / "four.npy", _rows(10, 4))
    np.save(tmp_path / "five.npy", _rows(10, 5))
    msg = _error(lambda: FileSource([tmp_path / "four.npy", tmp_path / "five.npy"], n_eval=1))
    assert "five.npy" in msg and "four.npy" in msg and "5" in msg and "4" in msg

    msg = _error(lambda: FileSource(tmp_path / "four.npy", n_eval=10))
    assert "four.npy" in msg and "10 rows" in msg and "11" in msg
    assert FileSource(tmp_path / "four.npy", n_eval=9).n_train == 1

    safetensors.numpy.save_file({"a": _rows(10, 4), "b": _rows(10, 4)}, str(tmp_path / "two.safetensors"))
    msg = _error(lambda: FileSource(tmp_path / "two.safetensors", n_eval=1))
    assert "two.safetensors" in msg and "'activations'" in msg and "a, b" in msg

    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 20)
    msg = _error(lambda: FileSource(tmp_path / "junk.safetensors", n_eval=1))
    assert "junk.safetensors" in msg


def test_files_bad_arguments(tmp_path):
    np.save(tmp_path / "x.npy", _rows(10, 4))
    with pytest.raises(ConfigError, match="n_eval"):
        FileSource(tmp_path / "x.npy", n_eval=0)
    with pytest.raises(ConfigError, match="seed"):
        FileSource(tmp_path / "x.npy", n_eval=1, seed=-2)


def test_bounded_shuffle_covers_every_row_once_and_reads_few_blocks_per_window(tmp_path):
    path = tmp_path / "acts.npy"
    np.save(path, np.arange(5000 * 4, dtype=np.float32).reshape(5000, 4))
    src = FileSource(path, n_eval=100, seed=1, shuffle_buffer=400)
    order = src._epoch_order(0)
    assert np.array_equal(np.sort(order), np.sort(src._train_rows))  # every training row exactly once
    assert np.array_equal(order, FileSource(path, n_eval=100, seed=1, shuffle_buffer=400)._epoch_order(0))
    assert not np.array_equal(order, src._epoch_order(1))
    position = {row: i for i, row in enumerate(src._train_rows)}  # index among training rows
    blocks = np.array([position[r] for r in order]) // 50  # blocks of 400 / 8 rows
    for lo in range(0, len(order), 400):
        assert len(np.unique(blocks[lo:lo + 400])) <= 9  # a window reads from at most 9 contiguous blocks
    assert len(np.unique(blocks[:400])) >= 5  # and does mix several of them
    batch = src.train_batch(3, 64)  # still a pure function of the step
    assert torch.equal(batch, FileSource(path, n_eval=100, seed=1, shuffle_buffer=400).train_batch(3, 64))
