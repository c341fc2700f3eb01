"""Rollouts for RL fine-tuning: prompts in, sampled completions and their per-token log-probabilities out.

    prompts = read_prompts("prompts.jsonl", llm, max_prompt_length=256)
    batch = sample_rollouts(llm, prompts[:8], group_size=4, params=SamplingParams(...), seeds=[...])
    hidden = response_hidden(model, batch)                  # [N, R, C] at the positions that predict the response
    logp = token_logprobs(model, hidden, batch, temperature=1.0)   # [N, R]
    with adapters_disabled(model): ref = ...                # the reference: the base without LoRA (align.run)

Completions come from our own sampler (``generate.stream_sequences``), row by row with a seed each, so a run is
reproducible and a resumed run samples exactly what the uninterrupted one would have. A completion that ended
with the end-of-turn token keeps it (the policy learns when to stop); one cut by ``max_new_tokens`` does not.

Tensors are response-aligned: row i's response token j sits in column j, whatever its prompt's length; ``mask``
is 1 on real response tokens. The hidden states that predict them are gathered from the full forward pass, so
the vocabulary projection (the largest matrix product) runs on response positions only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.errors import DataError
from scratchlm.finetune.data import read_jsonl
from scratchlm.generate import Sequence, stream_sequences
from scratchlm.sampling import SamplingParams


@dataclass
class Prompt:
    """One prompt: as written in the file (what a reward function receives), its conversation and token ids."""

    raw: str | list[dict]
    messages: list[dict]
    ids: list[int]
    line: int


def read_prompts(path: str | Path, llm, max_prompt_length: int) -> list[Prompt]:
    """Prompts from JSONL: ``{"prompt": "text"}``, ``{"prompt": [messages]}`` (TRL's prompt-only format) or
    ``{"messages": [...]}`` ending before the assistant's turn; rendered with the model's chat template.

    A DataError names the line of a malformed record or of a prompt longer than ``max_prompt_length`` tokens.
    """
    prompts = []
    for line, record in read_jsonl(path):
        where = f"{path}, line {line}"
        raw = record.get("prompt", record.get("messages"))
        if isinstance(raw, str):
            messages = [{"role": "user", "content": raw}]
        elif isinstance(raw, list) and raw and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                   and m.get("role") in ("system", "user", "assistant") for m in raw):
            messages = list(raw)
        else:
            raise DataError(f"{where}: expected {{\"prompt\": \"text\"}} or {{\"prompt\": [{{\"role\", \"content\"}}, "
                            f"...]}}, got the keys {sorted(record)}")
        if messages[-1]["role"] == "assistant":
            raise DataError(f"{where}: the prompt ends with an assistant turn; the policy writes that turn, so end "
                            "the prompt with a user message")
        ids = llm.encode_chat(messages, add_generation_prompt=True)
        if len(ids) > max_prompt_length:
            raise DataError(f"{where}: the prompt has {len(ids)} tokens, more than --max-prompt-length "
                            f"{max_prompt_length}: shorten it or raise the limit")
        prompts.append(Prompt(raw, messages, ids, line))
    return prompts


@dataclass
class RolloutBatch:
    """Sampled completions of some prompts, padded into response-aligned tensors (see the module docstring)."""

    prompts: list[Prompt]  # one per completion (a prompt repeats group_size times, consecutively)
    texts: list[str]  # the completions' text (without the end-of-turn token)
    input_ids: torch.Tensor  # [N, L] prompt + response, right-padded
    prompt_lengths: torch.Tensor  # [N]
    response_ids: torch.Tensor  # [N, R], 0 on padding
    mask: torch.Tensor  # [N, R] float, 1 on real response tokens

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, rows: torch.Tensor | list[int]) -> RolloutBatch:
        """The rows ``rows`` as a smaller batch (a minibatch), trimmed to its longest sequence."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        mask = self.mask[rows]
        R = max(int(mask.sum(1).max()), 1)
        L = int((self.prompt_lengths[rows] + mask.sum(1).long()).max())
        return RolloutBatch([self.prompts[i] for i in rows.tolist()], [self.texts[i] for i in rows.tolist()],
                            self.input_ids[rows, :L], self.prompt_lengths[rows], self.response_ids[rows, :R],
                            mask[:, :R])


def make_batch(prompts: list[Prompt], responses: list[list[int]], texts: list[str], pad_id: int) -> RolloutBatch:
    """Pad prompts + responses into a RolloutBatch (an empty response keeps one masked column)."""
    N = len(prompts)
    R = max(1, max(len(r) for r in responses))
    L = max(len(p.ids) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.full((N, L), pad_id, dtype=torch.long)
    response_ids = torch.zeros(N, R, dtype=torch.long)
    mask = torch.zeros(N, R)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, :len(p.ids) + len(r)] = torch.tensor(p.ids + r, dtype=torch.long)
        response_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1.0
    lengths = torch.tensor([len(p.ids) for p in prompts])
    return RolloutBatch(list(prompts), list(texts), input_ids, lengths, response_ids, mask)


@torch.no_grad()
def sample_rollouts(llm, prompts: list[Prompt], group_size: int, params: SamplingParams,
                    seeds: list[int]) -> RolloutBatch:
    """``group_size`` completions of each prompt from ``llm``'s model with our sampler, one seed per completion
    (``len(seeds) == len(prompts) * group_size``); all are decoded together as one batch."""
    model = llm.model
    was_training = model.training
    model.eval()
    repeated = [p for p in prompts for _ in range(group_size)]
    sequences = [Sequence(p.ids, dataclasses.replace(params, seed=s), llm.tokenizer, llm.eos_ids,
                          model.config.vocab_size, model.config.context_length) for p, s in zip(repeated, seeds)]
    try:
        for _ in stream_sequences(model, sequences):
            pass
    finally:
        model.train(was_training)
    responses = []
    for seq in sequences:
        ids = list(seq.output_ids)
        # push() drops the EOS it stopped at; the policy must learn to emit it, so it is part of the response.
        if seq.finish_reason == "stop" and len(ids) < seq.budget and llm.eos_ids:
            ids.append(llm.tokenizer.eos_id if llm.tokenizer.eos_id in llm.eos_ids else min(llm.eos_ids))
        responses.append(ids)
    pad_id = llm.tokenizer.eos_id if llm.tokenizer.eos_id is not None else 0
    return make_batch(repeated, responses, [s.text for s in sequences], pad_id)


def response_hidden(model: nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """Final hidden states [N, R, C] at the positions whose next token is a response token.

    Right padding needs no attention mask in a causal model (a token never sees later positions).
    """
    hidden = model.hidden_states(batch.input_ids)  # (N, L, C)
    R = batch.response_ids.shape[1]
    positions = batch.prompt_lengths[:, None] - 1 + torch.arange(R)  # (N, R): the token before response j
    positions = positions.clamp(max=hidden.shape[1] - 1).to(hidden.device)
    return torch.gather(hidden, 1, positions[:, :, None].expand(-1, -1, hidden.shape[2]))


def token_logprobs(model: nn.Module, hidden: torch.Tensor, batch: RolloutBatch, temperature: float = 1.0
                   ) -> torch.Tensor:
    """log pi(response token j | everything before it) [N, R], from ``response_hidden``; 0 on padding.

    Logits are divided by the sampling temperature first, so these are the probabilities of the distribution
    the tokens were drawn from (TRL does the same).
    """
    logits = model.logits(hidden).float() / max(temperature, 1e-5)  # (N, R, V)
    logprobs = torch.gather(F.log_softmax(logits, dim=-1), 2, batch.response_ids[:, :, None].to(logits.device))
    return logprobs.squeeze(2) * batch.mask.to(logits.device)


@torch.no_grad()
def score_batch(llm, batch: RolloutBatch, o: dict, value_model=None, chunk: int = 8) -> dict[str, torch.Tensor]:
    """Log-probabilities of the sampled responses under the policy and the reference (and values), in chunks,
    in eval mode (no dropout: these are the "old" policy's numbers the update compares against)."""
    from scratchlm.align.run import adapters_disabled
    from scratchlm.train.loop import autocast_context

    model = llm.model
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "ref_logprobs": [], "values": []}
    for start in range(0, len(batch), chunk):
        part = batch.select(list(range(start, min(start + chunk, len(batch)))))
        R = batch.mask.shape[1]
        with autocast_context(o["dtype"], "cpu"):
            hidden = response_hidden(model, part)
            parts["logprobs"].append(_pad(token_logprobs(model, hidden, part, o["temperature"]), R))
            if value_model is not None:
                parts["values"].append(_pad(value_model.head(hidden).squeeze(-1).float() * part.mask, R))
            if o["kl_coef"] > 0 or value_model is not None:
                with adapters_disabled(model):
                    ref = token_logprobs(model, response_hidden(model, part), part, o["temperature"])
                parts["ref_logprobs"].append(_pad(ref, R))
    model.train(was_training)
    return {k: torch.cat(v) for k, v in parts.items() if v}


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x.float(), (0, width - x.shape[1]))


@torch.no_grad()
def evaluate_prompts(llm, prompts: list[Prompt], reward, sampling, o: dict) -> dict:
    """Mean reward and mean summed KL to the reference of one sampled completion per held-out prompt (fixed
    seeds, so evaluations differ only by the policy)."""
    from scratchlm.align.ppo import kl_estimate

    batch = sample_rollouts(llm, prompts, 1, sampling, [o["seed"] * 7 + 10**9 + i for i in range(len(prompts))])
    scores = reward([p.raw for p in batch.prompts], batch.texts)
    scored = score_batch(llm, batch, {**o, "kl_coef": 1.0})
    kl = kl_estimate(scored["logprobs"], scored["ref_logprobs"], "k1") * batch.mask
    return {"val_reward": sum(scores) / len(scores), "val_kl": float(kl.sum(1).mean()),
            "val_response_length": float(batch.mask.sum(1).mean()), "val_sample": batch.texts[0][:200]}
