"""Our DPO/IPO losses, implicit rewards and margins, and our reward model's loss, equal TRL's trainers' on the same
tiny model, adapter, batch and beta; our preference rendering gives TRL's token ids.

The reference is TRL itself (DPOTrainer with a PEFT LoRA adapter and no reference model, so its reference is the
adapter switched off, as ours; RewardTrainer on HF's LlamaForSequenceClassification). The models are one tiny
random HF Llama, read by us with ``LLM.load`` and by TRL with ``from_pretrained``; the tokenizer is the byte
tokenizer of the other tests, with ChatML as its chat template.
"""

from __future__ import annotations

import pytest
import torch

from conftest import byte_tokenizer
from scratchlm.align.data import collate_pairs, render_pair, to_preference
from scratchlm.align.dpo import pair_loss
from scratchlm.align.reward import bradley_terry_loss, pair_rewards
from scratchlm.chat import DEFAULT_TEMPLATE
from scratchlm.finetune.peft import load_adapter
from scratchlm.heads import HeadModel
from scratchlm.llm import LLM

pytestmark = pytest.mark.usefixtures("one_thread")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

WORDS = ["apple", "river", "stone", "cloud"]
ROWS = [{"prompt": [{"role": "system", "content": "Be loud."}, {"role": "user", "content": f"Say {w}"}],
         "chosen": [{"role": "assistant", "content": f"{w.upper()}!"}],
         "rejected": [{"role": "assistant", "content": f"well... {w}"}]} for w in WORDS]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False, rms_norm_eps=1e-5, pad_token_id=258,
                                      eos_token_id=258)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    byte_tokenizer().save(directory / "tokenizer.json")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"),
                                                     eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = DEFAULT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


def hf_tokenizer(directory):
    return transformers.AutoTokenizer.from_pretrained(directory)


def trl_dpo(hf_dir, tmp_path, loss_type: str, beta: float):
    """A DPOTrainer on ROWS with a LoRA adapter whose B matrices are random (a policy away from its reference)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=loss_type, report_to=[],
                         use_cpu=True, per_device_train_batch_size=len(ROWS), max_length=128)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(ROWS),
                             processing_class=hf_tokenizer(hf_dir), peft_config=lora)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return trainer


def our_pairs(llm):
    return [render_pair(*to_preference(row, f"row {i}"), llm.template, llm.tokenizer) for i, row in enumerate(ROWS)]


def test_preference_rendering_gives_trls_token_ids(hf_dir, tmp_path):
    trainer = trl_dpo(hf_dir, tmp_path, "sigmoid", 0.1)
    llm = LLM.load(hf_dir)
    for pair, theirs in zip(our_pairs(llm), trainer.train_dataset):
        assert pair.prompt == theirs["prompt_ids"]
        assert pair.chosen == theirs["chosen_ids"] and pair.rejected == theirs["rejected_ids"]


@pytest.mark.parametrize("loss_type, beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1)])
def test_dpo_loss_rewards_and_margins_equal_trl(hf_dir, tmp_path, loss_type, beta):
    trainer = trl_dpo(hf_dir, tmp_path, loss_type, beta)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))  # all four pairs
    theirs = trainer.compute_loss(trainer.model, batch).item()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    trainer.model.save_pretrained(tmp_path / "adapter")
    llm = LLM.load(hf_dir)
    load_adapter(llm.model, tmp_path / "adapter", merge=False)
    pairs = our_pairs(llm)
    from scratchlm.align.dpo import reference_logps

    ref = reference_logps(llm.model, pairs, batch_size=2, pad_id=258)
    x, targets = collate_pairs(pairs, pad_id=258, ref_logps=ref)
    llm.model.train()
    loss, ours = pair_loss(llm.model, x, targets, beta, loss_type)
    assert abs(metrics["rewards/margins"]) > 1e-3  # the adapter moved the policy away from the reference
    assert loss.item() == pytest.approx(theirs, abs=1e-5)
    assert ours["rewards_chosen"] == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert ours["rewards_rejected"] == pytest.approx(metrics["rewards/rejected"], abs=1e-5)
    assert ours["margin"] == pytest.approx(metrics["rewards/margins"], abs=1e-5)
    assert ours["accuracy"] == pytest.approx(metrics["rewards/accuracies"], abs=1e-6)


def test_reward_model_loss_equals_trl_reward_trainer(hf_dir, tmp_path):
    torch.manual_seed(3)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir, num_labels=1)
    hf.config.pad_token_id = 258
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True,
                            per_device_train_batch_size=len(ROWS), max_length=128, center_rewards_coefficient=None)
    trainer = trl.RewardTrainer(model=hf, args=args, train_dataset=datasets.Dataset.from_list(ROWS),
                                processing_class=hf_tokenizer(hf_dir))
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    theirs = trainer.compute_loss(trainer.model, batch).item()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    llm = LLM.load(hf_dir)
    model = HeadModel(llm.model, n_outputs=1)
    with torch.no_grad():
        model.head.weight.copy_(hf.score.weight)
    pairs = our_pairs(llm)
    for pair, row in zip(pairs, trainer.train_dataset):  # TRL tokenizes the whole conversation
        assert pair.prompt + pair.chosen == row["chosen_ids"] and pair.prompt + pair.rejected == row["rejected_ids"]
    x, targets = collate_pairs(pairs, pad_id=258, shift=False)
    chosen, rejected = pair_rewards(model, x, targets)
    assert (chosen - rejected).abs().max() > 1e-4  # a random head already tells the answers apart
    assert bradley_terry_loss(chosen, rejected).mean().item() == pytest.approx(theirs, abs=1e-5)
    assert (chosen > rejected).float().mean().item() == pytest.approx(metrics["accuracy"])
    assert (chosen - rejected).mean().item() == pytest.approx(metrics["margin"], abs=1e-5)
