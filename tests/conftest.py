import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub: everything loads from disk
# token rows, the embedded corpus and activation caches go to a fresh folder, never the user's home cache;
# removed when the session ends (one the caller names is the caller's, and kept)
OWN_CACHE = None
if "SAE_SCALING_CACHE" not in os.environ:
    OWN_CACHE = os.environ["SAE_SCALING_CACHE"] = tempfile.mkdtemp(prefix="sae-scaling-test-cache-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray (orchestration tests): set before anything imports ray. No telemetry, no token file, loopback only.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest
import torch

torch.set_num_threads(2)

# what makes a test slow: a Ray cluster, gloo process groups, the quickstart sweep (`make test-fast` skips them)
SLOW_FIXTURES = {"ray_local", "_ray_local_session", "cluster"}
SLOW_MODULES = {"test_quickstart", "test_sharded", "test_sharded_sweep", "test_orchestration_cluster"}


def pytest_sessionfinish(session, exitstatus):
    if OWN_CACHE is not None:
        shutil.rmtree(OWN_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)

TINY_TEXT = [
    "Sparse autoencoders decompose activations into features. " * 3,
    "The residual stream carries information between layers of a transformer.",
    "def f(x):\n    return x * 2  # a docstring-like snippet with code",
    "Scaling laws relate loss to the number of latents and to compute.",
] * 20


def build_tokenizer():
    """A small GPT-2-style byte-level BPE tokenizer trained here: no hub needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TINY_TEXT, trainer)
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Randomly initialised 3-layer GPT-2 and GPT-NeoX saved with a tokenizer, as `save_pretrained` writes them."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig

    tok = build_tokenizer()
    vocab = len(tok)
    configs = {
        "gpt2": GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=vocab, n_positions=128,
                           bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id),
        "neox": GPTNeoXConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                              vocab_size=vocab, max_position_embeddings=128,
                              bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id),
    }
    out = {}
    for kind, cfg in configs.items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(kind)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
        tok.save_pretrained(folder)
        out[kind] = folder
    return out


# --- Ray ------------------------------------------------------------------------------------------------
RAY_LOCAL_OPTIONS = dict(address="local", num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024**2,
                         log_to_driver=False, configure_logging=False)


@pytest.fixture(scope="session")
def _ray_local_session():
    """The GCS address of the session's local Ray (started on first use), shut down at the end."""
    state: dict = {}
    yield state
    import ray

    if state.get("gcs") and ray.is_initialized() and ray.get_runtime_context().gcs_address == state["gcs"]:
        ray.shutdown()


def ensure_local_ray(state: dict):
    """The session's local Ray, (re)started if another cluster replaced it; module-scoped fixtures call this
    directly, since they cannot use the function-scoped `ray_local`."""
    import ray

    if not (ray.is_initialized() and ray.get_runtime_context().gcs_address == state.get("gcs")):
        if ray.is_initialized():
            ray.shutdown()
        ray.init(**RAY_LOCAL_OPTIONS)
        state["gcs"] = ray.get_runtime_context().gcs_address
    return ray


@pytest.fixture
def ray_local(_ray_local_session):
    """One local 2-CPU Ray for the whole session (`run_sweep` reuses it). A module that needs another cluster
    (tests/test_orchestration_cluster.py) shuts it down; the next test asking for it then starts a new one."""
    return ensure_local_ray(_ray_local_session)


@pytest.fixture
def corpus(tmp_path):
    """A glob of 40 small text files (TINY_TEXT) for the `data.text.files` source."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, text in enumerate(TINY_TEXT[:40]):
        (folder / f"doc{i:03d}.txt").write_text(text)
    return str(folder / "*.txt")
