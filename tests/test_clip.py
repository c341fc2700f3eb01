"""The small CLIP: shapes, the symmetric InfoNCE loss against a direct computation, padding, files, bad input,
and training through the shared loop (resume equals an uninterrupted run)."""

import math

import pytest
import torch
from safetensors.torch import load_file

from scratchlm.cli import main
from scratchlm.errors import ConfigError, ContextLengthError
from scratchlm.vision import CLIP, CLIPConfig, clip_loss
from scratchlm.vision.digits import HELDOUT_TEMPLATES, TRAIN_TEMPLATES, caption, digits_split, prompt_digit
from scratchlm.vision.vit import patchify

TINY = dict(vision_d_model=16, vision_layers=1, vision_heads=2, text_d_model=16, text_layers=1, text_heads=2,
            embed_dim=8)


@pytest.fixture
def tiny_clip():
    torch.manual_seed(0)
    return CLIP(CLIPConfig(**TINY)).eval()


def test_encoders_give_unit_vectors_of_the_shared_width(tiny_clip):
    images = torch.rand(3, 8, 8)
    u = tiny_clip.encode_images(images)
    v = tiny_clip.encode_texts(["a handwritten seven", "7", "the digit 3"])
    assert u.shape == (3, 8) and v.shape == (3, 8)
    assert torch.allclose(u.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(v.norm(dim=1), torch.ones(3), atol=1e-5)
    assert tiny_clip.classify(images, ["a zero", "a one"]).shape == (3,)


def test_patchify_cuts_row_by_row():
    image = torch.arange(64.0).view(1, 8, 8)
    patches = patchify(image, 2)
    assert patches.shape == (1, 16, 4)
    assert patches[0, 0].tolist() == [0, 1, 8, 9]  # top-left 2x2 block
    assert patches[0, 1].tolist() == [2, 3, 10, 11]  # its right neighbour
    assert patches[0, 4].tolist() == [16, 17, 24, 25]  # first block of the second row of blocks


def test_clip_loss_matches_the_direct_sum():
    torch.manual_seed(1)
    u = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    v = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    log_scale = torch.tensor(math.log(10.0))
    total = 0.0
    for i in range(5):  # image i against every caption, and caption i against every image
        image_row = [math.exp(10.0 * float(u[i] @ v[j])) for j in range(5)]
        text_row = [math.exp(10.0 * float(u[j] @ v[i])) for j in range(5)]
        total += -math.log(image_row[i] / sum(image_row)) - math.log(text_row[i] / sum(text_row))
    assert clip_loss(u, v, log_scale).item() == pytest.approx(total / 10, rel=1e-5)


def test_padding_does_not_change_a_text_embedding(tiny_clip):
    alone = tiny_clip.encode_texts(["seven"])
    padded = tiny_clip.encode_texts(["seven", "a much longer caption of a handwritten seven"])[:1]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_save_and_load_give_the_same_embeddings(tiny_clip, tmp_path):
    tiny_clip.save(tmp_path)
    loaded = CLIP.load(tmp_path)
    assert "text.lm_head.weight" not in load_file(tmp_path / "model.safetensors")  # tied: stored once
    images = torch.rand(2, 8, 8)
    assert torch.equal(loaded.encode_images(images), tiny_clip.encode_images(images))
    assert torch.equal(loaded.encode_texts(["the digit 4"]), tiny_clip.encode_texts(["the digit 4"]))


def test_bad_images_and_texts_are_one_line_errors(tiny_clip):
    with pytest.raises(ConfigError, match=r"\[N, 8, 8\].*got shape \(2, 16, 16\)"):
        tiny_clip.encode_images(torch.rand(2, 16, 16))
    with pytest.raises(ConfigError, match="in \\[0, 1\\]"):
        tiny_clip.encode_images(torch.rand(2, 8, 8) * 16)  # forgot to divide by 16
    with pytest.raises(ContextLengthError, match="longer than the text encoder's context of 64 bytes"):
        tiny_clip.encode_texts(["x" * 65])
    with pytest.raises(ConfigError, match="list of strings"):
        tiny_clip.encode_texts("seven")


def test_prompt_digit_finds_exactly_one_digit():
    assert prompt_digit("a handwritten Seven") == 7
    assert prompt_digit("the digit 7") == 7
    assert prompt_digit("a 7, i.e. seven") == 7
    for prompt in ("a handwritten cat", "17 apples", "a 3 and a 4", "version 2.0"):
        with pytest.raises(ConfigError, match="digit"):
            prompt_digit(prompt)


def test_the_split_and_templates_keep_the_test_honest():
    train, test = digits_split()
    assert len(train.labels) + len(test.labels) == 1797
    assert abs(len(test.labels) / 1797 - 0.2) < 0.01
    assert torch.bincount(test.labels).min() >= 35  # every class held out
    train_words = {w for t in TRAIN_TEMPLATES for w in t.format(word="", numeral="").split()}
    for template in HELDOUT_TEMPLATES:  # the zero-shot captions bring words training never showed
        assert set(template.format(word="", numeral="").split()) - train_words
    assert caption(7, "the digit {numeral} ({word})") == "the digit 7 (seven)"


def test_training_resumes_exactly(tmp_path):
    from scratchlm.vision.train_clip import train_clip

    options = dict(batch_size=16, eval_interval=4, warmup_steps=1, progress=False, **TINY)
    whole = train_clip(tmp_path / "whole", max_steps=4, **options)
    train_clip(tmp_path / "parts", max_steps=2, pictures=False, **options)
    parts = train_clip(tmp_path / "parts", max_steps=4, resume=True, progress=False, pictures=False)
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), parts.model.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert 0.0 <= whole.zero_shot <= 1.0 and set(whole.per_template) == set(HELDOUT_TEMPLATES)
    for name in ("clip_config.json", "model.safetensors", "retrieval.png", "loss.png", "metrics.jsonl", "run.json"):
        assert (tmp_path / "whole" / name).is_file(), name
    assert CLIP.load(tmp_path / "whole").config == CLIPConfig(**TINY)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["clip", "classify", str(tmp_path), "a drawing of {word}"]) == 2
    assert "holds no CLIP model" in capsys.readouterr().err
    CLIP(CLIPConfig(**TINY)).save(tmp_path)
    assert main(["clip", "classify", str(tmp_path), "a drawing of a digit"]) == 2
    err = capsys.readouterr().err
    assert "no {word} or {numeral}" in err and len(err.strip().splitlines()) == 1
