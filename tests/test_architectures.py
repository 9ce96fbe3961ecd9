"""Every registered architecture keeps the contract the trainer, storage, sweep plans and analysis rely on. The
configs are built from each class (its Config's defaults, its sparsity keys), never per family, so a new
architecture is tested here by registering it."""
import pytest
import torch

from sae_core import SAE, Trainer
from sae_core.architectures import Architecture, parse_sae_config
from sae_core.architectures.base import registry  # importing the package above registered every family
from sae_core.sources import SyntheticSource

D_IN, N_LATENTS, BATCH = 16, 64, 256
BUDGET = 4  # an integer sparsity key is a budget of active latents (k): small, so any multiple fits in N_LATENTS
SRC = SyntheticSource(d_in=D_IN, n_features=64, active_per_vector=3, noise_std=0.01, seed=0, n_eval=256)
NAMES = sorted(registry())


def small_config(name: str, n_latents: int = N_LATENTS) -> dict:
    """The family's config with its defaults, d_in and n_latents set and its integer sparsity keys at BUDGET."""
    cls = registry()[name]
    fields = cls.Config.model_fields
    cfg = {"arch": name, "d_in": D_IN, "n_latents": n_latents}
    cfg.update({key: BUDGET for key in cls.sparsity_keys if fields[key].annotation is int})
    return cfg


def inputs(rows: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, D_IN, generator=torch.Generator().manual_seed(seed))


def randomise(sae: SAE) -> None:
    """Every parameter and buffer off its initial value, so a round trip that dropped one would show."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in sae.net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for b in sae.net.buffers():  # running statistics (BatchTopK's threshold): kept positive
            b.copy_(torch.rand(b.shape, generator=g) * 0.1)


def test_every_architecture_class_is_registered():
    def concrete(cls):
        for sub in cls.__subclasses__():
            if "name" in vars(sub):
                yield sub
            yield from concrete(sub)
    assert {cls.name: cls for cls in concrete(Architecture)} == registry()


@pytest.mark.parametrize("name", NAMES)
def test_sparsity_keys_are_config_keys(name):
    cls = registry()[name]
    assert set(cls.sparsity_keys) <= set(cls.Config.model_fields), cls.sparsity_keys
    assert len(set(cls.sparsity_keys)) == len(cls.sparsity_keys)
    if cls.l0_set_by_k:  # the joint L(n, k) is fitted over the runs' k column
        assert cls.sparsity_keys[0] == "k"


@pytest.mark.parametrize("name", NAMES)
def test_encode_decode_shapes_and_sparsity(name):
    sae = SAE(small_config(name))
    cls, cfg = registry()[name], sae.cfg
    x = inputs()
    z = sae.encode(x)
    assert z.shape == (len(x), N_LATENTS)
    assert sae.decode(z).shape == (len(x), D_IN) and sae.reconstruct(x).shape == x.shape
    assert torch.isfinite(sae.reconstruct(x)).all()
    active = (z != 0).sum(dim=1).float()
    assert 0 < active.mean() <= N_LATENTS
    if cls.l0_set_by_k:
        assert active.mean() <= cfg.k


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip_gives_identical_outputs(name, tmp_path):
    sae = SAE(small_config(name))
    randomise(sae)
    sae.save(tmp_path / name)
    loaded = SAE.load(tmp_path / name)
    assert loaded.cfg == sae.cfg
    x = inputs()
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded.reconstruct(x), sae.reconstruct(x))
    state, again = sae.net.state_dict(), loaded.net.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)


@pytest.mark.parametrize("name", NAMES)
def test_flops_per_vector_positive_and_growing_with_width(name):
    cls = registry()[name]
    small, wide = (cls.flops_per_vector(parse_sae_config(small_config(name, n))) for n in (N_LATENTS, 2 * N_LATENTS))
    assert 0 < small < wide


@pytest.mark.parametrize("name", NAMES)
def test_one_training_step_has_a_finite_loss_and_moves_the_weights(name):
    session = Trainer(small_config(name), {"train_tokens": 2 * BATCH, "batch_size": BATCH, "init_samples": 1024,
                                           "lr": 1e-3, "device": "cpu"}, SRC).start()
    net = session.sae.net
    before = {k: p.detach().clone() for k, p in net.named_parameters()}
    out = session.step(SRC.train_batch(0, BATCH))
    assert out is not None and torch.isfinite(out.loss) and out.flops > 0
    # the step counts what the planner charges (compute accounting: RunPlan.flops, the L(C) axis)
    assert out.flops / BATCH == pytest.approx(registry()[name].flops_per_vector(session.sae.cfg))
    for k in ("W_enc", "W_dec"):
        assert not torch.equal(dict(net.named_parameters())[k], before[k]), k
