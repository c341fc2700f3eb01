"""Fine-tuning data (scratchlm.finetune.data): chat rendering, assistant-only loss masks, batches, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_llm
from scratchlm.errors import DataError
from scratchlm.finetune.data import (
    IGNORE,
    SFTBatches,
    collate,
    fixed_batches,
    load_examples,
    read_jsonl,
    render_example,
    split_examples,
    to_messages,
)
from scratchlm.finetune.run import sft_loss
from scratchlm.train.loop import lm_loss

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"},
        {"role": "assistant", "content": "Madrid."}]


@pytest.fixture(scope="module")
def llm():
    return tiny_llm("llama")


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def learned_text(llm, example) -> str:
    return llm.tokenizer.decode([t for t, keep in zip(example.ids, example.learn) if keep])


# ---- rendering and masks -------------------------------------------------------------------------------------
def test_only_the_assistant_turns_are_learned(llm):
    example = render_example(CHAT, llm.template, llm.tokenizer)
    assert learned_text(llm, example) == "Paris.<|im_end|>\nMadrid.<|im_end|>\n"
    assert llm.tokenizer.decode(example.ids) == llm.template.render(CHAT, add_generation_prompt=False)


def test_the_prompt_ids_are_exactly_what_chat_feeds_the_model(llm):
    example = render_example(CHAT[:3], llm.template, llm.tokenizer)
    first_learned = example.learn.index(True)
    assert example.ids[:first_learned] == llm.encode_chat(CHAT[:2])


def test_targets_are_shifted_ids_with_minus_100_outside_the_answers(llm):
    example = render_example(CHAT[:3], llm.template, llm.tokenizer)
    x, y = example.inputs_and_targets()
    assert x == example.ids[:-1] and len(y) == len(x)
    for j, target in enumerate(y):
        assert target == (example.ids[j + 1] if example.learn[j + 1] else IGNORE)
    assert sum(t != IGNORE for t in y) == len("Paris.") + 2  # bytes of the answer, <|im_end|>, newline


def test_prompt_completion_lines_equal_the_messages_layout(llm):
    record = {"system": "Be brief.", "prompt": "Capital of France?", "completion": "Paris."}
    a = render_example(to_messages(record, "x"), llm.template, llm.tokenizer)
    b = render_example(CHAT[:3], llm.template, llm.tokenizer)
    assert (a.ids, a.learn) == (b.ids, b.learn)


def test_smollm2_template_masks_only_the_answer(smollm2):
    example = render_example(CHAT, smollm2.template, smollm2.tokenizer)
    assert learned_text(smollm2, example) == "Paris.<|im_end|>\nMadrid.<|im_end|>\n"
    assert example.ids[: example.learn.index(True)] == smollm2.encode_chat(CHAT[:2])


# ---- bad input -----------------------------------------------------------------------------------------------
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_a_malformed_json_line_is_reported_with_its_line_number(tmp_path, llm):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, '{"messages": [', GOOD])
    with pytest.raises(DataError, match=r"line 3: not valid JSON"):
        load_examples(path, llm.template, llm.tokenizer, 128)


def test_a_line_that_is_not_an_object_is_reported(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "[1, 2]"])
    with pytest.raises(DataError, match=r"line 2: expected a JSON object, got list"):
        read_jsonl(path)


def test_an_unknown_role_is_reported_with_the_allowed_ones(tmp_path, llm):
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, bad])
    with pytest.raises(DataError, match=r"line 2: message 1 has unknown role 'bot'; allowed roles: system, user"):
        load_examples(path, llm.template, llm.tokenizer, 128)


def test_a_conversation_without_an_assistant_turn_is_reported(tmp_path, llm):
    bad = {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [bad])
    with pytest.raises(DataError, match=r"line 1: the conversation has no assistant turn"):
        load_examples(path, llm.template, llm.tokenizer, 128)


def test_a_record_of_neither_layout_names_the_expected_keys(tmp_path, llm):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match=r"line 1: expected \{\"messages\".*got the keys \['text'\]"):
        load_examples(path, llm.template, llm.tokenizer, 128)


def test_an_empty_file_and_a_missing_file_are_data_errors(tmp_path, llm):
    (tmp_path / "e.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no examples"):
        load_examples(tmp_path / "e.jsonl", llm.template, llm.tokenizer, 128)
    with pytest.raises(DataError, match="not found"):
        load_examples(tmp_path / "missing.jsonl", llm.template, llm.tokenizer, 128)


def test_too_long_examples_are_counted_and_truncated_or_skipped(tmp_path, llm):
    long_answer = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x" * 200}]}
    long_prompt = {"messages": [{"role": "user", "content": "y" * 200}, {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, long_answer, long_prompt, GOOD])
    examples, stats = load_examples(path, llm.template, llm.tokenizer, 64, "truncate")
    # The long answer is cut to 64 ids and still has answer tokens; the long prompt has none left: skipped.
    assert (stats.too_long, stats.truncated, stats.skipped, stats.skipped_lines) == (2, 1, 1, [3])
    assert len(examples) == 3 and max(len(e.ids) for e in examples) == 64
    assert "2 longer than 64 tokens: 1 truncated, 1 skipped (lines 3)" in stats.describe(64)
    examples, stats = load_examples(path, llm.template, llm.tokenizer, 64, "skip")
    assert (stats.too_long, stats.truncated, stats.skipped, len(examples)) == (2, 0, 2, 2)


# ---- batches -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def examples(llm, tmp_path_factory):
    rows = [{"messages": [{"role": "user", "content": f"question {i} " + "w" * (i % 7)},
                          {"role": "assistant", "content": f"answer {i}" + "!" * (i % 5)}]} for i in range(23)]
    path = write_jsonl(tmp_path_factory.mktemp("d") / "d.jsonl", rows)
    return load_examples(path, llm.template, llm.tokenizer, 128)[0]


def test_right_padding_leaves_the_real_positions_unchanged(llm, examples):
    x, y = collate(examples[:4], pad_id=0)
    assert (y[x == 0] == IGNORE).all()
    with torch.no_grad():
        batched = llm.model(x)
        for row, example in enumerate(examples[:4]):
            ids, _ = example.inputs_and_targets()
            alone = llm.model(torch.tensor([ids]))[0]
            torch.testing.assert_close(batched[row, : len(ids)], alone, atol=1e-5, rtol=1e-5)


def test_sft_loss_equals_the_loop_loss_over_all_logits(llm, examples):
    x, y = collate(examples[:5], pad_id=0)
    with torch.no_grad():
        torch.testing.assert_close(sft_loss(llm.model, x, y), lm_loss(llm.model(x), y), atol=1e-6, rtol=1e-6)


def test_each_epoch_shows_every_example_once_in_a_new_order(examples):
    batches = SFTBatches(examples, 4, pad_id=0, seed=3)
    assert batches.batches_per_epoch == 6
    rows = [next(batches)[0].shape[0] for _ in range(12)]
    assert sum(rows[:6]) == 23 and sum(rows[6:]) == 23
    first = SFTBatches(examples, 4, 0, seed=3)._epoch_plan()
    assert sorted(i for b in first for i in b) == list(range(23))
    second = SFTBatches(examples, 4, 0, seed=3)
    second.epoch = 1
    assert second._epoch_plan() != first


def test_batches_resume_from_their_state(examples):
    a = SFTBatches(examples, 4, pad_id=0, seed=1)
    for _ in range(8):  # into the second epoch
        next(a)
    b = SFTBatches(examples, 4, pad_id=0, seed=1)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(7):
        xa, ya = next(a)
        xb, yb = next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_validation_split_is_seeded_disjoint_and_fixed_batches_cover_it(examples):
    train, val = split_examples(examples, 0.2, seed=0)
    again, val_again = split_examples(examples, 0.2, seed=0)
    assert [e.line for e in val] == [e.line for e in val_again] and len(val) == 5
    assert not {e.line for e in train} & {e.line for e in val} and len(train) + len(val) == 23
    batches = fixed_batches(val, 2, pad_id=0)
    assert sum(x.shape[0] for x, _ in batches) == 5
