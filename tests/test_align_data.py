"""Preference data (scratchlm.align.data): both TRL layouts, the chat template, response-only targets, too-long pairs
and one-line errors with line numbers."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_llm
from scratchlm.align.data import (
    PreferenceBatches,
    check_preferences,
    collate_pairs,
    load_preferences,
    render_pair,
    to_preference,
)
from scratchlm.errors import DataError

PLAIN = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "I like turtles."}
CHAT = {"prompt": [{"role": "user", "content": "Name a colour."}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "I like turtles."}]}


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def llm():
    return tiny_llm()


def test_plain_and_conversational_records_render_alike_with_the_chat_template(llm):
    plain = render_pair(*to_preference(PLAIN, "x"), llm.template, llm.tokenizer)
    chat = render_pair(*to_preference(CHAT, "x"), llm.template, llm.tokenizer)
    assert plain == chat
    # The prompt is exactly what chat inference feeds the model; each response ends with the end of its turn.
    assert plain.prompt == llm.encode_chat([{"role": "user", "content": "Name a colour."}])
    assert llm.tokenizer.decode(plain.chosen) == "Blue.<|im_end|>\n"
    assert llm.tokenizer.decode(plain.rejected) == "I like turtles.<|im_end|>\n"
    system = render_pair(*to_preference({**PLAIN, "system": "Be brief."}, "x"), llm.template, llm.tokenizer)
    assert llm.tokenizer.decode(system.prompt).startswith("<|im_start|>system\nBe brief.")


def test_targets_cover_the_response_tokens_only_and_rows_are_chosen_then_rejected(llm):
    pairs = [render_pair(*to_preference(r, "x"), llm.template, llm.tokenizer)
             for r in (PLAIN, {**PLAIN, "chosen": "Red, surely."})]
    x, batch = collate_pairs(pairs, pad_id=0)
    assert x.shape[0] == 4
    for row, (pair, which) in enumerate([(pairs[0], "chosen"), (pairs[1], "chosen"), (pairs[0], "rejected"),
                                          (pairs[1], "rejected")]):
        response = getattr(pair, which)
        learned = batch.targets[row][batch.targets[row] != -100].tolist()
        assert learned == response
        assert batch.lengths[row] == len(pair.prompt) + len(response) - 1
        # each target is the next input token
        ids = pair.prompt + response
        assert x[row, : len(ids) - 1].tolist() == ids[:-1]
    whole, head_batch = collate_pairs(pairs, pad_id=0, shift=False)
    assert head_batch.lengths.tolist() == [len(p.prompt) + len(getattr(p, w)) for w in ("chosen", "rejected")
                                           for p in pairs]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "chosen": "b"}', "line 2: expected .* missing rejected"),
    ('{"prompt": "a", "chosen": "b", "rejected": "b"}', "line 2: \"chosen\" and \"rejected\" are identical"),
    ('{"prompt": "a", "chosen": 3, "rejected": "b"}', "line 2: \"chosen\" must be a string or a non-empty list"),
    ('{"prompt": "a", "chosen": [{"role": "user", "content": "b"}], "rejected": "c"}',
     "line 2: \"chosen\" must hold assistant messages only"),
    ('{"prompt": [{"role": "wizard", "content": "a"}], "chosen": "b", "rejected": "c"}',
     "line 2: message 0 has unknown"),
    ('{"prompt": "", "chosen": "b", "rejected": "c"}', "line 2: \"prompt\" is empty"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"', "line 2"),
])
def test_malformed_lines_are_one_line_errors_with_their_line_number(tmp_path, line, message):
    path = write(tmp_path / "p.jsonl", [PLAIN, line])
    with pytest.raises(DataError, match=message) as info:
        check_preferences(path)
    assert "\n" not in str(info.value)


def test_too_long_pairs_are_truncated_or_skipped_and_counted(tmp_path, llm):
    long_answer = "word " * 60
    path = write(tmp_path / "p.jsonl", [PLAIN, {**PLAIN, "chosen": long_answer}, {"prompt": "x " * 80, **{
        k: PLAIN[k] for k in ("chosen", "rejected")}}])
    pairs, stats = load_preferences(path, llm.template, llm.tokenizer, max_length=64)
    assert (stats.pairs, stats.too_long, stats.truncated, stats.skipped) == (2, 2, 1, 1)
    assert stats.skipped_lines == [3]  # its prompt alone fills 64 tokens: nothing left to learn
    assert all(len(p.prompt) + len(p.chosen) <= 64 and len(p.prompt) + len(p.rejected) <= 64 for p in pairs)
    assert "2 with a sequence longer than 64 tokens: 1 truncated, 1 skipped (lines 3)" in stats.describe(64)
    pairs, stats = load_preferences(path, llm.template, llm.tokenizer, max_length=64, too_long="skip")
    assert (stats.pairs, stats.skipped, stats.skipped_lines) == (1, 2, [2, 3])
    with pytest.raises(DataError, match="every pair was skipped"):
        load_preferences(write(tmp_path / "q.jsonl", [PLAIN]), llm.template, llm.tokenizer, max_length=8)


def test_batches_resume_where_they_stopped_and_carry_the_cached_reference(llm):
    pairs = [render_pair(*to_preference({**PLAIN, "chosen": f"Colour {i}."}, "x"), llm.template, llm.tokenizer)
             for i in range(7)]
    ref = torch.arange(14, dtype=torch.float32).view(7, 2)
    first = PreferenceBatches(pairs, 3, pad_id=0, seed=1, ref_logps=ref)
    for _ in range(4):
        next(first)
    second = PreferenceBatches(pairs, 3, pad_id=0, seed=1, ref_logps=ref)
    second.load_state_dict(first.state_dict())
    for _ in range(3):
        (xa, a), (xb, b) = next(first), next(second)
        assert torch.equal(xa, xb) and torch.equal(a.targets, b.targets) and torch.equal(a.ref_logps, b.ref_logps)
    # a pair's cached (chosen, rejected) reference values travel with its rows
    x, batch = next(PreferenceBatches(pairs, 7, pad_id=0, seed=0, ref_logps=ref))
    for row in range(7):
        index = next(i for i, p in enumerate(pairs) if x[row, : len(p.prompt + p.chosen) - 1].tolist()
                     == (p.prompt + p.chosen)[:-1])
        assert batch.ref_logps[row] == ref[index, 0] and batch.ref_logps[row + 7] == ref[index, 1]


def test_the_demonstration_set_is_seeded_held_out_and_checkable():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "make_preferences.py"
    spec = importlib.util.spec_from_file_location("make_preferences", path)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    train, test = gen.make(0)
    assert (train, test) == gen.make(0) and train != gen.make(1)[0]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for row in train + test:
        assert gen.follows_style(row["chosen"]) and not gen.follows_style(row["rejected"])
        assert row["chosen"] == f"{gen.OPENER} {row['rejected']}"
        to_preference(row, "demo")
    assert gen.follows_style(' "Ahoy! Paris.') and not gen.follows_style("Paris. Ahoy!")
