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
  (llama.cpp also quantizes the activations to 8 bits for these types, so near-ties may flip). For scale,
  the table also shows how often rounding the activations the same way flips scratchlm's own argmax.

Prints a Markdown table for benchmarks/RESULTS.md and exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
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
REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "src/scratchlm/data/shakespeare.txt"
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
    new = [int(np.argmax(logits_after(prompt)[-1]))]
    while len(new) < job["greedy_tokens"]:  # decode one token at a time against llama.cpp's KV cache
        llm.eval(new[-1:])
        new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    greedy.append(new)
out["greedy"] = greedy
argmax = []
for window in job["windows"]:
    argmax += [int(i) for i in np.argmax(logits_after(window), axis=-1)]
out["argmax"] = argmax
json.dump(out, sys.stdout)
'''


def llama_cpp(python: str, job: dict) -> dict:
    """Run one job in the llama-cpp-python worker."""
    # Passive OpenMP waiting: spinning threads crawl when other processes share the cores.
    env = {**os.environ, "OMP_WAIT_POLICY": "passive"}
    done = subprocess.run([python, "-c", WORKER], input=json.dumps(job), capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"llama.cpp worker failed on {job['model']}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def ours(llm, greedy_prompts: list[list[int]], windows: list[list[int]]) -> dict:
    """scratchlm's greedy continuations and per-position logits over the windows."""
    import torch

    greedy = []
    with torch.no_grad():
        for prompt in greedy_prompts:
            ids = list(prompt)
            for _ in range(GREEDY_TOKENS):  # full forward each step: no EOS stop, same as the worker
                ids.append(int(llm.model(torch.tensor([ids]))[0, -1].argmax()))
            greedy.append(ids[len(prompt):])
        logits = torch.cat([llm.model(torch.tensor([w]))[0] for w in windows])
    return {"greedy": greedy, "argmax": logits.argmax(-1).tolist(), "logits": logits}


@contextlib.contextmanager
def eight_bit_activations(model):
    """Round the input of every linear layer as llama.cpp does before a quantized matmul: blocks of 32 values,
    scale max|x| / 127 stored as float16, integers in -127..127 (Q8_0/Q8_1). This is not how scratchlm runs;
    it measures how many argmaxes of a passage such rounding alone flips: the noise floor for quantized files."""
    import torch

    def rounded(module, args):
        x = args[0]
        blocks = x.reshape(-1, 32)
        d = blocks.abs().amax(1, keepdim=True) / 127
        q = torch.round(blocks * torch.where(d == 0, torch.zeros_like(d), 1 / d))
        return ((q * d.half().float()).reshape(x.shape),)

    hooks = [m.register_forward_pre_hook(rounded) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def disagreement_margins(our_logits, our_argmax: list[int], their_argmax: list[int]) -> list[float]:
    """At each position where the argmaxes differ: how much higher our logit for our token is than our logit
    for llama.cpp's token. Small margins mean near-ties."""
    return [float(our_logits[i, a] - our_logits[i, b])
            for i, (a, b) in enumerate(zip(our_argmax, their_argmax)) if a != b]


def train_gpt2(work: Path, steps: int, threads: int) -> Path:
    """A GPT-2-style model trained from scratch on the bundled Shakespeare with its own BPE tokenizer."""
    out = work / "shakespeare-bpe"
    if (out / "best" / "model.safetensors").is_file():
        return out / "best"
    cmd = [sys.executable, "-m", "scratchlm.cli", "--threads", str(threads), "train", "--preset", "shakespeare-bpe",
           "--out", str(out), "--max-steps", str(steps), "--force", "--no-progress", "--sample-tokens", "0"]
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
                passages: dict[str, str]) -> list[dict]:
    """Export ``source`` with every GGUF type and compare each file in llama.cpp and scratchlm."""
    from scratchlm.formats.export_gguf import export_gguf

    rows = []
    for gguf_type in GGUF_TYPES:
        path = work / f"{label}.{gguf_type}.gguf"
        start = time.perf_counter()
        export_gguf(source, path, gguf_type, force=True)
        exported = time.perf_counter() - start
        rows.append(compare_file(label, gguf_type, path, python, threads, prompts, passages, exported))
    return rows


def compare_file(label: str, gguf_type: str, path: Path, python: str, threads: int, prompts: list[str],
                 passages: dict[str, str], exported: float | None = None) -> dict:
    """One GGUF file in llama.cpp and in scratchlm: token ids, greedy tokens (f32/f16), argmax agreement."""
    from scratchlm.llm import LLM

    llm = LLM.load(path)  # scratchlm reads the very file llama.cpp reads
    ctx = llm.config.context_length
    texts = [*prompts, *passages.values(), AWKWARD]
    passage_ids = {name: llm.tokenizer.encode(text)[:PASSAGE_TOKENS] for name, text in passages.items()}
    windows = {name: windows_of(ids, min(ctx, PASSAGE_TOKENS)) for name, ids in passage_ids.items()}
    quantized = gguf_type.split()[0] not in ("f32", "f16")
    job = {"model": str(path), "n_ctx": ctx, "threads": threads, "texts": texts,
           "windows": [w for ws in windows.values() for w in ws],
           "greedy_prompts": [] if quantized else [llm.tokenizer.encode(p) for p in prompts],
           "greedy_tokens": GREEDY_TOKENS}
    theirs = llama_cpp(python, job)
    mine = ours(llm, job["greedy_prompts"], job["windows"])
    row = {"model": label, "type": gguf_type, "MiB": path.stat().st_size / 2**20, "export_s": exported,
           "tokens_equal": theirs["tokens"] == [llm.tokenizer.encode(t) for t in texts],
           "agreement": {}, "noise_floor": {}, "max_gap": {}}
    offset = 0
    for name, ids in passage_ids.items():
        span = slice(offset, offset + len(ids))
        offset += len(ids)
        mine_here, theirs_here = mine["argmax"][span], theirs["argmax"][span]
        row["agreement"][name] = agreement(theirs_here, mine_here)
        row["max_gap"][name] = max(disagreement_margins(mine["logits"][span], mine_here, theirs_here), default=0)
        if quantized:
            with eight_bit_activations(llm.model):
                rounded = ours(llm, [], windows[name])["argmax"]
            row["noise_floor"][name] = agreement(rounded, mine_here)
    if quantized:
        row["ok"] = row["tokens_equal"] and min(row["agreement"].values()) >= MIN_ARGMAX_AGREEMENT
    else:
        row["greedy_equal"] = theirs["greedy"] == mine["greedy"]
        row["greedy_matching_prefix"] = [
            next((i for i, (a, b) in enumerate(zip(t, m)) if a != b), GREEDY_TOKENS)
            for t, m in zip(theirs["greedy"], mine["greedy"])]
        row["ok"] = row["tokens_equal"] and row["greedy_equal"]
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    home = Path(os.environ.get("SCRATCHLM_HOME", Path.home() / ".cache" / "scratchlm"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-python", default=str(home / "llamacpp-venv" / "bin" / "python"),
                        help="python of the virtualenv with llama-cpp-python (scripts/setup_llamacpp.sh)")
    parser.add_argument("--work", default="/tmp/scratchlm-llamacpp-proof", help="where the exports go")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the GPT-2-style model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["smollm2", "gpt2"], default=None)
    parser.add_argument("--control-only", action="store_true", help="only the pulled SmolLM2 file (the control)")
    args = parser.parse_args()
    if not Path(args.llama_python).is_file():
        raise SystemExit(f"{args.llama_python} not found: run `bash scripts/setup_llamacpp.sh` first")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    import torch

    from scratchlm.llm import LLM

    torch.set_num_threads(args.threads)
    corpus = CORPUS.read_text(encoding="utf-8")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    # Shakespeare near the end of the plays (hard, archaic text: many near-ties for SmolLM2), and technical
    # English with code (the README).
    shakespeare = {"shakespeare": corpus[-6000:-3000]}
    rows = []
    if args.only in (None, "smollm2"):
        smollm2 = LLM.load("smollm2-135m-instruct")
        prompts = [smollm2.template.render([{"role": "user", "content": "What is the capital of France?"}]),
                   "The three primary colours are", "def fibonacci(n):\n"]
        passages = {**shakespeare, "readme": readme[:4000]}
        # Control: the pulled file, written by llama.cpp's own converter and quantizer, not by us.
        from scratchlm.hub import model_path

        rows.append(compare_file("smollm2 (pulled file, llama.cpp's own)", "q4_1 (+q8_0 embedding)",
                                 model_path("smollm2-135m-instruct"), args.llama_python, args.threads, prompts,
                                 passages))
        if not args.control_only:
            rows += check_model("smollm2", smollm2, work, args.llama_python, args.threads, prompts, passages)
        del smollm2
    if args.only in (None, "gpt2") and not args.control_only:
        gpt2 = LLM.load(train_gpt2(work, args.steps, args.threads))
        prompts = ["ROMEO:\n", "First Citizen:\nWe are", "KING HENRY:\nNow"]
        rows += check_model("shakespeare-gpt2", gpt2, work, args.llama_python, args.threads, prompts, shakespeare)

    print("\n| model | type | MiB | token ids equal | greedy 32 equal (matching prefix per prompt) "
          f"| argmax agreement, {PASSAGE_TOKENS} positions | scratchlm vs itself with 8-bit activations "
          "| largest logit gap where they differ | result |")
    print("|---|---|---|---|---|---|---|---|---|")

    def per_passage(values: dict, fmt: str) -> str:
        return ", ".join(f"{name} {fmt.format(v)}" for name, v in values.items()) or "n/a"

    for r in rows:
        greedy = (f"{'yes' if r['greedy_equal'] else 'no'} ({', '.join(map(str, r['greedy_matching_prefix']))})"
                  if "greedy_equal" in r else "n/a")
        pct = {k: 100 * v for k, v in r["agreement"].items()}
        floor = {k: 100 * v for k, v in r["noise_floor"].items()}
        print(f"| {r['model']} | {r['type']} | {r['MiB']:.1f} | {'yes' if r['tokens_equal'] else 'NO'} | {greedy} "
              f"| {per_passage(pct, '{:.1f}%')} | {per_passage(floor, '{:.1f}%')} "
              f"| {per_passage(r['max_gap'], '{:.3f}')} | {'pass' if r['ok'] else 'FAIL'} |")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
