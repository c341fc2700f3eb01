"""SmolLM2-135M-Instruct (pulled GGUF) against HF transformers loading the same file.

Both dequantize the Q4_1/Q8_0 blocks with the `gguf` package into the same float32 weights, so the two
forward passes differ only in the order of floating-point sums (fused SDPA against HF's attention):
errors of order 1e-6 relative, growing through 30 layers to ~1e-4 on logits of magnitude ~20. A
max-abs tolerance of 1e-3 on the logits leaves room for that and still catches any real difference (a
wrong RoPE layout or norm shifts logits by whole units).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

PASSAGE = (
    "The sea was calm that morning, and the fishermen of the little harbour rose before dawn to mend their "
    "nets. Old Tomas, who had sailed these waters for fifty-two years, said the weather would turn by noon; "
    "nobody believed him, for the sky was clear from the cliffs to the horizon. By half past eleven a grey wall "
    "of cloud stood in the west, and the gulls came in low over the breakwater. The younger men laughed less "
    "now. They hauled the boats up the shingle, lashed the masts, and carried the catch - 312 kilograms of "
    "mackerel, a good morning's work - into the stone shed by the chapel. When the first gust struck, the "
    "shutters of the inn banged like drums and the children ran shrieking into their mothers' kitchens. Tomas "
    "sat by the window with his pipe, watching the water turn from blue to pewter to black. He did not say he "
    "had been right. He had been right too often to find any pleasure in it. Instead he thought about the "
    "winter of 1987, when the storm had taken the pier and two good boats with it, and about his brother, "
    "who had gone out that night to check the moorings and had come back soaked, shaking and grinning. "
    "The storm lasted three days. On the fourth morning the harbour was full of driftwood and broken crates."
)


@pytest.fixture(scope="module")
def hf_model(smollm2_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def passage_ids(smollm2):
    ids = smollm2.tokenizer.encode(PASSAGE)[:256]
    assert len(ids) == 256
    return torch.tensor([ids])


def test_logits_match_hf_on_a_256_token_passage(smollm2, hf_model, passage_ids):
    with torch.no_grad():
        ours = smollm2.model(passage_ids)
        ref = hf_model(passage_ids).logits
    assert ours.shape == ref.shape == (1, 256, 49152)
    assert (ours - ref).abs().max().item() < 1e-3
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.99


def test_32_greedy_tokens_equal_hf(smollm2, hf_model):
    prompt = "The three most important inventions of the nineteenth century were"
    ids = smollm2.tokenizer.encode(prompt)
    ours = smollm2.complete([prompt], max_new_tokens=32, temperature=0, ignore_eos=True)[0].token_ids
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert ours == ref[0, len(ids):].tolist()
    assert len(ours) == 32


def test_chat_answers_the_capital_of_france_like_hf(smollm2, hf_model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = smollm2.chat(messages, temperature=0, max_new_tokens=64)
    assert reply == "The capital of France is Paris."
    ids = smollm2.encode_chat(messages)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, eos_token_id=2)
    assert smollm2.tokenizer.decode(ref[0, len(ids):].tolist(), skip_special=True) == reply


def test_chat_template_matches_hf_apply_chat_template(smollm2, smollm2_path):
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    conversations = [
        [{"role": "user", "content": "Hi!"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
         {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}],
    ]
    for messages in conversations:
        for add in (True, False):
            expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
            assert smollm2.template.render(messages, add_generation_prompt=add) == expected


def test_batched_generation_equals_one_prompt_at_a_time(smollm2):
    prompts = ["Paris is", "The largest planet in the solar system is called"]
    batched = smollm2.complete(prompts, max_new_tokens=12, temperature=0)
    alone = [smollm2.complete([p], max_new_tokens=12, temperature=0)[0] for p in prompts]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]


def test_bfloat16_greedy_stays_close_to_float32(smollm2_path, smollm2):
    from scratchlm.llm import LLM

    bf16 = LLM.load(smollm2_path, dtype="bfloat16")
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    assert bf16.chat(prompt, temperature=0, max_new_tokens=16) == smollm2.chat(prompt, temperature=0, max_new_tokens=16)
