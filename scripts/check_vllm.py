"""Does vLLM, serving scratchlm's HF export, answer what HF transformers answers? (docs/scale.md)

    .venv/bin/python scripts/check_vllm.py --model-dir /tmp/smollm2-hf --url http://127.0.0.1:8011

Sends greedy requests (temperature 0, float32 on both sides) to a running vLLM server, one plain completion per
prompt and one chat completion, and generates the same continuations with HF transformers' ``generate``
(``do_sample=False``) and with scratchlm's ``LLM`` from the same directory. Prints each answer and exits 1 unless
all three agree on every prompt. `scripts/check_vllm.sh` installs vLLM, exports the model, starts the server
and runs this. Not run in CI: vLLM is a large download.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]
QUESTION = "What is the capital of France?"


def post(url: str, body: dict) -> dict:
    """POST JSON, return the decoded answer."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.load(resp)


def served_model_id(url: str) -> str:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=60) as resp:
        return json.load(resp)["data"][0]["id"]


def hf_greedy(model, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    """HF transformers' greedy continuation of ``ids``, without the end-of-sequence token."""
    import torch

    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, len(ids):].tolist()
    return tokenizer.decode(new, skip_special_tokens=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", required=True, help="the HF directory vLLM serves (scratchlm convert --to hf)")
    ap.add_argument("--url", default="http://127.0.0.1:8011", help="the vLLM server, without /v1")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scratchlm import LLM

    torch.manual_seed(0)
    model_id = served_model_id(args.url)
    hf = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    ours = LLM.load(args.model_dir)
    n = args.max_tokens
    failures = 0

    def report(label: str, vllm_text: str, hf_text: str, our_text: str) -> None:
        nonlocal failures
        ok = vllm_text == hf_text == our_text
        failures += not ok
        print(f"{'same' if ok else 'DIFFERENT'}  {label!r}")
        print(f"  vLLM:         {vllm_text!r}")
        print(f"  transformers: {hf_text!r}")
        print(f"  scratchlm:    {our_text!r}")

    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        answer = post(f"{args.url}/v1/completions",
                      {"model": model_id, "prompt": ids, "max_tokens": n, "temperature": 0})
        our = ours.generate(prompt, max_new_tokens=n, temperature=0)
        report(prompt, answer["choices"][0]["text"], hf_greedy(hf, tok, ids, n), our)

    messages = [{"role": "user", "content": QUESTION}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    answer = post(f"{args.url}/v1/chat/completions",
                  {"model": model_id, "messages": messages, "max_tokens": n, "temperature": 0})
    our = ours.chat(messages, max_new_tokens=n, temperature=0)
    report(f"chat: {QUESTION}", answer["choices"][0]["message"]["content"], hf_greedy(hf, tok, ids, n), our)

    total = len(PROMPTS) + 1
    print(f"{total - failures}/{total} greedy answers identical in vLLM, HF transformers and scratchlm (float32)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
