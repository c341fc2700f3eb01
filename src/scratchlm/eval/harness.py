"""A backend for EleutherAI's lm-evaluation-harness that runs scratchlm models in process.

    lm_eval's requests -> token ids (split exactly as its ``hf`` backend splits them)
        -> group the requests whose contexts are the same (a multiple-choice question's choices)
        -> prefill each context once into a KV cache, copy its rows for every choice
        -> feed each choice's tokens against its copy -> the log-probabilities of the choice

A four-choice question costs one pass over its context instead of four, which is most of the work in
multiple-choice tasks (contexts are long, answers a few tokens). Results match the ``hf`` backend on the
same weights to float32 rounding: the same tokens are scored at the same positions.

lm-eval 0.4 finds models only in its own registry (it reads no entry points), so the name ``scratchlm`` exists
once this module is imported. ``python -m scratchlm.eval.harness --model scratchlm --model_args
pretrained=NAME ...`` does that and then runs lm_eval's own command line with the same arguments.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from scratchlm.errors import ConfigError
from scratchlm.llm import LLM
from scratchlm.model import KVCache

TOKEN_BUDGET = 8192  # cached positions (rows x length) per batch: bounds the KV memory of one step
CONTINUATION_ROWS = 16  # continuations fed together, sorted by length: bounds the padding


@register_model("scratchlm")
class ScratchLM(TemplateLM):
    """lm-eval's ``LM`` interface over a scratchlm model: ``loglikelihood``, ``loglikelihood_rolling`` and
    ``generate_until``.

    ``pretrained`` is anything ``LLM.load`` takes (a known name, a GGUF file, a model directory);
    ``quantize``, ``group_size``, ``adapter``, ``dtype`` and ``tokenizer`` are passed on to it. ``max_length``
    caps the tokens the model sees at once (default: its context length), as the ``hf`` backend's does.
    ``batch_size`` and ``max_batch_size`` are accepted for lm-eval's command line and ignored: batches are
    sized by ``token_budget`` positions instead.
    """

    def __init__(self, pretrained: str | LLM, quantize: str | None = None, group_size: int | None = None,
                 adapter: str | None = None, dtype: str = "float32", device: str | None = "cpu",
                 tokenizer: str | None = None, max_length: int | None = None, token_budget: int = TOKEN_BUDGET,
                 batch_size=None, max_batch_size=None, progress: bool = True, **unused):
        super().__init__()
        if unused:  # a misspelt --model_args key would otherwise be ignored without a word
            raise ConfigError(f"unknown scratchlm model argument(s) {', '.join(sorted(unused))}: known are pretrained, "
                              "quantize, group_size, adapter, dtype, device, tokenizer, max_length, token_budget")
        if isinstance(pretrained, LLM):
            self.llm = pretrained
        else:
            if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
                device = "cpu"  # lm_eval's command line asks for cuda unless told otherwise, as its hf does
            options = {"tokenizer": tokenizer} if tokenizer is not None else {}
            self.llm = LLM.load(pretrained, dtype=dtype, device=device, quantize=quantize,
                                group_size=None if group_size is None else int(group_size), adapter=adapter,
                                **options)
        self.model = self.llm.model.eval()
        self.tok = self.llm.tokenizer
        self._device = next(self.model.parameters()).device
        self._max_length = int(max_length) if max_length else self.model.config.context_length
        self.token_budget = int(token_budget)
        self.progress = progress

    # ---- what TemplateLM needs ----------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        # The token an empty context stands for: BOS when the tokenizer has one, else EOS (as in ``hf``).
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.llm.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # No BOS is added: scratchlm's tokenizers (and their HF exports) have no post-processor that adds one.
        return self.tok.encode(string, allowed_special="all")

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.llm.template.render(chat_history, add_generation_prompt=add_generation_prompt)

    # ---- log-likelihoods ----------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation | context), whether every continuation token is the argmax)`` for
        each ``(cache_key, context_ids, continuation_ids)``, in order."""
        # The model sees the last max_length tokens of context + continuation minus the final token; the
        # scored tokens are the continuation's. Requests whose (truncated) contexts agree share one prefill.
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (_, context, continuation) in enumerate(requests):
            window = (context + continuation)[-(self.max_length + 1):]
            groups[tuple(window[: len(window) - len(continuation)])].append(i)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="scratchlm loglikelihood", unit="req",
                   disable=disable_tqdm or not self.progress, dynamic_ncols=True)
        for batch in self._batches(groups, requests):
            scored = self._score(batch, requests)
            for i, result in scored.items():
                results[i] = result
                key = requests[i][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, result)
            bar.update(len(scored))
        bar.close()
        return results  # type: ignore[return-value]

    def _batches(self, groups: dict, requests) -> Iterator[list[tuple[tuple[int, ...], list[int]]]]:
        """Groups, longest context first (so a batch pads little), packed until the KV budget is reached."""
        order = sorted(groups.items(), key=lambda g: -len(g[0]))
        batch: list = []
        rows = most_context = most_continuation = 0
        for context, members in order:
            longest = max(len(requests[i][2]) for i in members)
            # Every row is padded to the longest context + the longest continuation of the batch, and padded
            # rows reach position width - 2: keep that inside the window that positions are defined for.
            new_rows = rows + len(members)
            new_width = max(most_context, len(context)) + max(most_continuation, longest)
            if batch and (new_rows * new_width > self.token_budget or new_width > self.max_length + 1):
                yield batch
                batch, new_rows = [], len(members)
                most_context = most_continuation = 0
            batch.append((context, members))
            rows = new_rows
            most_context, most_continuation = max(most_context, len(context)), max(most_continuation, longest)
        if batch:
            yield batch

    @torch.inference_mode()
    def _score(self, batch: list[tuple[tuple[int, ...], list[int]]], requests) -> dict[int, tuple[float, bool]]:
        model, device = self.model, self._device
        contexts = [list(c) for c, _ in batch]
        members = [i for _, m in batch for i in m]
        continuations = [requests[i][2] for i in members]
        owner = torch.tensor([g for g, (_, m) in enumerate(batch) for _ in m], device=device)  # row -> group
        width = max(len(c) for c in contexts) + max(len(c) for c in continuations)
        dtype = next(model.parameters()).dtype

        # 1. Each distinct context once: right-padded, its last position predicts the first continuation token.
        shared = KVCache(model.config, len(contexts), max_len=width, dtype=dtype, device=device)
        lengths = torch.tensor([len(c) for c in contexts], device=device)
        ids = torch.zeros(len(contexts), int(lengths.max()), dtype=torch.long, device=device)
        for row, c in enumerate(contexts):
            ids[row, : len(c)] = torch.tensor(c)
        hidden = model.hidden_states(ids, shared, input_lengths=lengths)  # (G, T, C)
        first = model.logits(hidden[torch.arange(len(contexts)), lengths - 1]).float().log_softmax(-1)  # (G, V)

        # 2. Continuations, shortest first in chunks of similar length (little padding): each row gets a copy
        # of its context's cached keys and values, then its tokens (all but the last) go in at once.
        out = {}
        rows = sorted(range(len(members)), key=lambda r: len(continuations[r]))
        for at in range(0, len(rows), CONTINUATION_ROWS):
            chunk = rows[at: at + CONTINUATION_ROWS]
            index = owner[chunk]
            feed = torch.tensor([len(continuations[r]) - 1 for r in chunk], device=device)
            rest = None
            if int(feed.max()) > 0:
                cache = KVCache(model.config, len(chunk), max_len=width, dtype=dtype, device=device)
                torch.index_select(shared.k, 1, index, out=cache.k)
                torch.index_select(shared.v, 1, index, out=cache.v)
                cache.lengths.copy_(lengths[index])
                ids = torch.zeros(len(chunk), int(feed.max()), dtype=torch.long, device=device)
                for j, r in enumerate(chunk):
                    ids[j, : feed[j]] = torch.tensor(continuations[r][:-1])
                rest = model.hidden_states(ids, cache, input_lengths=feed)  # (rows, T, C)
            # The real (unpadded) positions of the whole chunk through the LM head at once: one pass over its
            # weight (113 MB for SmolLM2) instead of one per row.
            later = None
            if rest is not None:
                real = torch.arange(rest.shape[1], device=device)[None, :] < feed[:, None]  # (rows, T)
                later = model.logits(rest[real]).float().log_softmax(-1).split(feed.tolist())
            for j, r in enumerate(chunk):
                target = torch.tensor(continuations[r], device=device)
                logprobs = first[index[j]][None]
                if later is not None and feed[j] > 0:
                    logprobs = torch.cat([logprobs, later[j]])
                chosen = logprobs.gather(1, target[:, None])[:, 0]
                out[members[r]] = (float(chosen.sum()), bool((logprobs.argmax(-1) == target).all()))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in disjoint windows of ``max_length`` tokens, the first token
        predicted from the prefix token (the ``hf`` backend's windows: ``scratchlm eval perplexity`` with
        ``--context max_length+1 --stride max_length`` on the prefix token + the text scores the same tokens)."""
        windows, owners = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owners, scores):
            totals[n] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # ---- generation ---------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) completions that end at any of ``until`` or EOS; requests
        with the same generation settings run as one batch."""
        results: list[str | None] = [None] * len(requests)
        by_settings: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            by_settings[repr(sorted(req.args[1].items()))].append(i)
        bar = tqdm(total=len(requests), desc="scratchlm generate_until", unit="req",
                   disable=disable_tqdm or not self.progress, dynamic_ncols=True)
        for members in by_settings.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            sampling = {"temperature": float(kwargs.get("temperature", 1.0))} if kwargs.get("do_sample") else \
                {"temperature": 0.0}
            limit = self.max_length - max_new
            for start in range(0, len(members), 16):
                chunk = members[start:start + 16]
                prompts = [self.tok_encode(requests[i].args[0])[-limit:] for i in chunk]
                completions = self.llm.complete(prompts, max_new_tokens=max_new, stop=until, **sampling)
                for i, completion in zip(chunk, completions):
                    results[i] = completion.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, completion.text)
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]


TASKS_DIR = Path(__file__).resolve().parent / "tasks"  # the offline tasks (scripts/make_harness_tasks.py)


def evaluate(model: ScratchLM, tasks: list[str], num_fewshot: int | None = None, limit: int | None = None,
             log_samples: bool = False) -> dict:
    """Run lm-eval's ``simple_evaluate`` on ``tasks`` (lm-eval's own, or the offline ``scratchlm_*`` ones)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # Indexing lm-eval's thousands of task files takes ~20 s on a small CPU: skip it when only ours are asked.
    offline = all(t.startswith("scratchlm_") for t in tasks)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=not offline)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown harness task(s) {', '.join(unknown)}: offline ones are "
                          f"{', '.join(sorted(t for t in manager.all_tasks if t.startswith('scratchlm')))}; "
                          "`lm_eval ls tasks` lists lm-eval's own (they download their data)")
    return simple_evaluate(model=model, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                           log_samples=log_samples)


def scores(results: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from ``evaluate``'s results (standard errors and filter names left out)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, _ = key.partition(",")
            if isinstance(value, (int, float)) and not metric.endswith("_stderr") and metric != "sample_len":
                out.setdefault(task, {})[metric] = float(value)
    return out


def summary_table(results: dict) -> str:
    """A plain-text table: task, metric, value, standard error, examples."""
    lines = [f"{'task':<28} {'metric':<16} {'value':>12} {'stderr':>10} {'n':>6}"]
    for task, metrics in sorted(scores(results).items()):
        n = results.get("n-samples", {}).get(task, {}).get("effective", "")
        for metric, value in metrics.items():
            err = next((v for k, v in results["results"][task].items() if k.startswith(metric + "_stderr,")), None)
            err_text = f"{err:.4f}" if isinstance(err, float) else ""
            lines.append(f"{task:<28} {metric:<16} {value:>12.6g} {err_text:>10} {n!s:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """lm_eval's command line with ``--model scratchlm`` available."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in args:  # the offline scratchlm_* tasks, beside lm-eval's own
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = [sys.argv[0], *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
