"""Proof that llama.cpp runs the GGUF files `scratchlm convert` writes, as scratchlm does. Not part of CI.

    bash scripts/setup_llamacpp.sh                 # once: builds llama-cpp-python into its own venv (~6 min)
    .venv/bin/python scripts/llamacpp_proof.py     # [--llama-python PATH] [--work DIR] [--steps N]

Two models, each exported with every --gguf-type (f32, f16, q8_0, q4_0, q4_1):

1. SmolLM2-135M-Instruct (Llama architecture), loaded from the pulled Q4_1 file and re-exported;
2. a GPT-2-style model trained from scratch here (`scratchlm train --preset shakespeare-bpe`, learned
   positions, LayerNorm, GELU, its own byte-level BPE), written under llama.cpp's `gpt2` architecture.

For each file llama.cpp (through llama-cpp-python, run in a separate virtualenv as a worker process) and
scratchlm (`LLM.load` of the same file) are compared on:

- token ids: llama.cpp's tokenizer against ours, on the prompts, the passage and awkward text: must be equal;
- f32 / f16: the first 32 greedy tokens after each fixed prompt: must be equal;
- q8_0 / q4_0 / q4_1: next-token argmax at every position of a 256-token passage: >= 95% agreement
  (llama.cpp also quantizes the activations to 8 bits for these types, so near-ties may flip).

Prints a Markdown table for benchmarks/RESULTS.md and exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
GREEDY_TOKENS = 32
PASSAGE_TOKENS = 256
MIN_ARGMAX_AGREEMENT = 0.95
CORPUS = Path(__file__).resolve().parents[1] / "src/scratchlm/data/shakespeare.txt"
AWKWARD = "Numbers 1234567 and 3.14159, CAPS'LL don't\n\n\t  tabs  ünïcödé 日本語 ✓ <|im_end|> end"

# The llama.cpp side: runs under the llama-cpp-python virtualenv, reads a job as JSON on stdin.
WORKER = r'''
import json, sys
import numpy as np
from llama_cpp import Llama

job = json.load(sys.stdin)
llm = Llama(model_path=job["model"], n_ctx=job["n_ctx"], n_batch=512, n_threads=job["threads"],
            logits_all=True, verbose=False, seed=0)
out = {"tokens": [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in job["texts"]]}

def logits_after(ids):
    llm.reset()
    llm.eval(ids)
    return np.asarray(llm.scores[: llm.n_tokens])

greedy = []
for prompt in job["greedy_prompts"]:
    ids = list(prompt)
    for _ in range(job["greedy_tokens"]):
        ids.append(int(np.argmax(logits_after(ids)[-1])))
    greedy.append(ids[len(prompt):])
out["greedy"] = greedy
argmax = []
for window in job["windows"]:
    argmax += [int(i) for i in np.argmax(logits_after(window), axis=-1)]
out["argmax"] = argmax
json.dump(out, sys.stdout)
'''


def llama_cpp(python: str, job: dict) -> dict:
    """Run one job in the llama-cpp-python worker."""
    done = subprocess.run([python, "-c", WORKER], input=json.dumps(job), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"llama.cpp worker failed on {job['model']}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def ours(llm, greedy_prompts: list[list[int]], windows: list[list[int]]) -> dict:
    import torch

    greedy = []
    with torch.no_grad():
        for prompt in greedy_prompts:
            ids = list(prompt)
            for _ in range(GREEDY_TOKENS):  # full forward each step: no EOS stop, same as the worker
                ids.append(int(llm.model(torch.tensor([ids]))[0, -1].argmax()))
            greedy.append(ids[len(prompt):])
        argmax = []
        for window in windows:
            argmax += llm.model(torch.tensor([window]))[0].argmax(-1).tolist()
    return {"greedy": greedy, "argmax": argmax}


def train_gpt2(work: Path, steps: int) -> Path:
    """A GPT-2-style model trained from scratch on the bundled Shakespeare with its own BPE tokenizer."""
    out = work / "shakespeare-bpe"
    if (out / "best" / "model.safetensors").is_file():
        return out / "best"
    cmd = [sys.executable, "-m", "scratchlm.cli", "train", "--preset", "shakespeare-bpe", "--out", str(out),
           "--max-steps", str(steps), "--overwrite", "--no-progress", "--sample-tokens", "0"]
    try:
        import scratchlm.train.bpe  # noqa: F401
    except ImportError:
        cmd += ["--tokenizer", str(stand_in_bpe(work))]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out / "best" if (out / "best").is_dir() else out / "last"


def stand_in_bpe(work: Path) -> Path:
    """Only while scratchlm's BPE trainer is missing: a 1,024-token byte-level BPE trained on the same corpus
    by HF ``tokenizers``, with GPT-2's pre-tokenizer, so that the model still has a BPE of its own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = work / "stand-in-bpe" / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(CORPUS)], trainer)
    tok.save(str(path))
    (path.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    print(f"scratchlm.train.bpe is not available: using a stand-in BPE trained by HF tokenizers ({path})")
    return path


def windows_of(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def check_model(label: str, source, work: Path, python: str, threads: int, prompts: list[str],
                passage: str) -> list[dict]:
    from scratchlm.formats.export_gguf import export_gguf
    from scratchlm.llm import LLM

    rows = []
    for gguf_type in GGUF_TYPES:
        path = work / f"{label}.{gguf_type}.gguf"
        start = time.perf_counter()
        export_gguf(source, path, gguf_type, force=True)
        exported = time.perf_counter() - start
        llm = LLM.load(path)  # scratchlm reads the very file llama.cpp reads
        ctx = llm.config.context_length
        texts = [*prompts, passage, AWKWARD]
        our_tokens = [llm.tokenizer.encode(t) for t in texts]
        greedy_prompts = [llm.tokenizer.encode(p) for p in prompts]
        passage_ids = llm.tokenizer.encode(passage)[:PASSAGE_TOKENS]
        windows = windows_of(passage_ids, min(ctx, PASSAGE_TOKENS))
        job = {"model": str(path), "n_ctx": ctx, "threads": threads, "texts": texts, "windows": windows,
               "greedy_prompts": greedy_prompts if gguf_type in ("f32", "f16") else [],
               "greedy_tokens": GREEDY_TOKENS}
        theirs = llama_cpp(python, job)
        mine = ours(llm, job["greedy_prompts"], windows)
        tokens_equal = theirs["tokens"] == our_tokens
        agree = sum(a == b for a, b in zip(theirs["argmax"], mine["argmax"])) / len(mine["argmax"])
        row = {"model": label, "type": gguf_type, "MiB": path.stat().st_size / 2**20, "export_s": exported,
               "tokens_equal": tokens_equal, "argmax_agreement": agree, "positions": len(mine["argmax"])}
        if gguf_type in ("f32", "f16"):
            row["greedy_equal"] = theirs["greedy"] == mine["greedy"]
            row["greedy_matching_prefix"] = [
                next((i for i, (a, b) in enumerate(zip(t, m)) if a != b), GREEDY_TOKENS)
                for t, m in zip(theirs["greedy"], mine["greedy"])]
            row["ok"] = tokens_equal and row["greedy_equal"]
        else:
            row["ok"] = tokens_equal and agree >= MIN_ARGMAX_AGREEMENT
        print(json.dumps(row), flush=True)
        rows.append(row)
        del llm
    return rows


def main() -> int:
    home = Path(os.environ.get("SCRATCHLM_HOME", Path.home() / ".cache" / "scratchlm"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-python", default=str(home / "llamacpp-venv" / "bin" / "python"),
                        help="python of the virtualenv with llama-cpp-python (scripts/setup_llamacpp.sh)")
    parser.add_argument("--work", default="/tmp/scratchlm-llamacpp-proof", help="where the exports go")
    parser.add_argument("--steps", type=int, default=600, help="training steps of the GPT-2-style model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["smollm2", "gpt2"], default=None)
    args = parser.parse_args()
    if not Path(args.llama_python).is_file():
        raise SystemExit(f"{args.llama_python} not found: run `bash scripts/setup_llamacpp.sh` first")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    import torch

    from scratchlm.llm import LLM

    torch.set_num_threads(args.threads)
    corpus = CORPUS.read_text(encoding="utf-8")
    passage = corpus[-6000:-3000]  # a stretch near the end of the plays, as plain text
    rows = []
    if args.only in (None, "smollm2"):
        smollm2 = LLM.load("smollm2-135m-instruct")
        prompts = [smollm2.template.render([{"role": "user", "content": "What is the capital of France?"}]),
                   "The three primary colours are", "def fibonacci(n):\n"]
        rows += check_model("smollm2", smollm2, work, args.llama_python, args.threads, prompts, passage)
        del smollm2
    if args.only in (None, "gpt2"):
        gpt2 = LLM.load(train_gpt2(work, args.steps))
        prompts = ["ROMEO:\n", "First Citizen:\nWe are", "KING HENRY:\nNow"]
        rows += check_model("shakespeare-gpt2", gpt2, work, args.llama_python, args.threads, prompts, passage)

    print("\n| model | type | MiB | token ids equal | greedy 32 equal (matching prefix per prompt) "
          "| argmax agreement | result |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        greedy = (f"{'yes' if r['greedy_equal'] else 'no'} ({', '.join(map(str, r['greedy_matching_prefix']))})"
                  if "greedy_equal" in r else "n/a")
        print(f"| {r['model']} | {r['type']} | {r['MiB']:.1f} | {'yes' if r['tokens_equal'] else 'NO'} | {greedy} "
              f"| {100 * r['argmax_agreement']:.1f}% of {r['positions']} | {'pass' if r['ok'] else 'FAIL'} |")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
