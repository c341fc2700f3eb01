"""BPE training time, compression and encoding speed: scratchlm against HF `tokenizers`.

    .venv/bin/python benchmarks/tokenizer.py              # prints a table with scratchlm / HF ratios
    .venv/bin/python benchmarks/tokenizer.py --record     # ... and appends it to benchmarks/RESULTS.md

Training: `train_bpe` against HF's BpeTrainer configured the same way (ByteLevel alphabet of 256 bytes,
GPT-4's split regex, no prefix space, 8,192 tokens with "<|endoftext|>" included) on the bundled 1 MB
corpus. Compression: corpus bytes per token, each trainer's tokenizer encoding the corpus.
Encoding: one 5 MB string (the corpus repeated) encoded by scratchlm's `Tokenizer.encode` and by HF's
`Tokenizer.encode` loading the same tokenizer.json, single-threaded (RAYON_NUM_THREADS=1,
TOKENIZERS_PARALLELISM=false); with SmolLM2's tokenizer from the pulled GGUF and with the 8,192-token
tokenizer trained here. Both produce the same ids (checked). Each repeat builds fresh tokenizers, so both
word caches start cold.

Every measurement alternates scratchlm and HF within each repeat (REPEATS, median and best), so load from
other processes on this shared machine hits both alike. HF trains single-threaded here, like scratchlm; a
child process also times it with its default thread pool (2 threads on this machine) for reference.
"""

from __future__ import annotations

import os

# Before `tokenizers` is imported: its thread pool reads these once.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from common import append_results, machine

VOCAB_SIZE = 8192
SPECIALS = ["<|endoftext|>"]
ENCODE_BYTES = 5_000_000
REPEATS = 3


def corpus_text() -> str:
    from scratchlm.train.sources import bundled_corpus

    return bundled_corpus().read_text(encoding="utf-8")


def hf_train(text: str):
    """HF tokenizers' BpeTrainer, configured as scratchlm's train_bpe: (tokenizer, seconds)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from scratchlm.tokenizer import GPT4_PATTERN

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_PATTERN), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    start = time.perf_counter()
    hf.train_from_iterator([text], trainer)
    return hf, time.perf_counter() - start


def ours_train(text: str):
    from scratchlm.train.bpe import train_bpe

    start = time.perf_counter()
    tokenizer = train_bpe([text], VOCAB_SIZE, SPECIALS)
    return tokenizer, time.perf_counter() - start


def summary(times: list[float]) -> tuple[float, float]:
    return statistics.median(times), min(times)


def bench_training(text: str) -> dict:
    ours_t, hf_t = [], []
    ours_train(text[:100_000])  # warm-up: imports, regex compilation
    hf_train(text[:100_000])
    for _ in range(REPEATS):
        ours, t = ours_train(text)
        ours_t.append(t)
        hf, t = hf_train(text)
        hf_t.append(t)
    n_bytes = len(text.encode("utf-8"))
    child = subprocess.run([sys.executable, __file__, "--child", "hf-train-default-threads"], capture_output=True,
                           text=True, env={k: v for k, v in os.environ.items()
                                           if k not in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")})
    hf_threads = json.loads(child.stdout.strip().splitlines()[-1]) if child.returncode == 0 else None
    return {
        "ours_s": summary(ours_t), "hf_s": summary(hf_t), "hf_threads": hf_threads,
        "ours_bpt": n_bytes / len(ours.encode(text)), "hf_bpt": n_bytes / len(hf.encode(text).ids),
        "ours_vocab": ours.vocab_size, "hf_vocab": hf.get_vocab_size(), "ours": ours,
    }


def bench_encoding(name: str, make_ours, tokenizer_json: Path, text: str) -> dict:
    """Encode `text` as one string with fresh tokenizers each repeat; ids must agree."""
    import tokenizers

    n_mb = len(text.encode("utf-8")) / 1e6
    ours_t, hf_t = [], []
    warm = text[:50_000]
    make_ours().encode(warm)
    tokenizers.Tokenizer.from_file(str(tokenizer_json)).encode(warm, add_special_tokens=False)
    for _ in range(REPEATS):
        ours = make_ours()
        start = time.perf_counter()
        ours_ids = ours.encode(text)
        ours_t.append(time.perf_counter() - start)
        hf = tokenizers.Tokenizer.from_file(str(tokenizer_json))
        start = time.perf_counter()
        hf_ids = hf.encode(text, add_special_tokens=False).ids
        hf_t.append(time.perf_counter() - start)
        if ours_ids != hf_ids:
            raise SystemExit(f"{name}: scratchlm and HF tokenizers disagree on the benchmark text")
    return {"name": name, "ours_mbs": [n_mb / t for t in summary(ours_t)], "hf_mbs": [n_mb / t for t in summary(hf_t)],
            "tokens": len(ours_ids)}


def smollm2_tokenizer_factory():
    import gguf

    from scratchlm.hub import pull
    from scratchlm.tokenizer import Tokenizer

    reader = gguf.GGUFReader(str(pull("smollm2-135m-instruct", progress=False)))
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.ggml.")}
    return lambda: Tokenizer.from_gguf_metadata(meta)


def versions() -> str:
    from importlib.metadata import version

    return (f"Python {platform.python_version()}, tokenizers {version('tokenizers')}, regex {version('regex')}, "
            f"tqdm {version('tqdm')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    text = corpus_text()
    if args.child == "hf-train-default-threads":
        hf_train(text[:100_000])
        print(json.dumps(summary([hf_train(text)[1] for _ in range(REPEATS)])))
        return

    train = bench_training(text)
    print("training: done", file=sys.stderr)
    big = (text * (ENCODE_BYTES // len(text) + 1))[:ENCODE_BYTES]  # 5 MB when the text is ASCII, a little more if not
    encodings = []
    with tempfile.TemporaryDirectory() as tmp:
        from scratchlm.tokenizer import Tokenizer

        smollm = smollm2_tokenizer_factory()
        smollm().save(Path(tmp) / "smollm2.json")
        encodings.append(bench_encoding("SmolLM2-135M (49,152 tokens, GGUF)", smollm, Path(tmp) / "smollm2.json", big))
        print("encoding SmolLM2: done", file=sys.stderr)
        train["ours"].save(Path(tmp) / "trained.json")
        trained = lambda: Tokenizer.from_file(Path(tmp) / "trained.json")  # noqa: E731
        encodings.append(bench_encoding(f"trained here ({VOCAB_SIZE:,} tokens)", trained, Path(tmp) / "trained.json",
                                        big))
        print("encoding trained: done", file=sys.stderr)

    n_mb = len(big.encode("utf-8")) / 1e6
    (om, ob), (hm, hb) = train["ours_s"], train["hf_s"]
    lines = [
        f"BPE training, {VOCAB_SIZE:,} tokens on the {len(text.encode()) / 1e6:.2f} MB corpus (median / best of "
        f"{REPEATS}):",
        "",
        "| | scratchlm | HF tokenizers | scratchlm / HF |",
        "|---|---|---|---|",
        f"| training time, 1 thread | {om:.2f} / {ob:.2f} s | {hm:.2f} / {hb:.2f} s | "
        f"{om / hm:.2f}x / {ob / hb:.2f}x |",
    ]
    if train["hf_threads"]:
        tm, tb = train["hf_threads"]
        lines.append(f"| training time, HF with its default threads | | {tm:.2f} / {tb:.2f} s | "
                     f"{om / tm:.2f}x / {ob / tb:.2f}x |")
    lines += [
        f"| bytes per token on the corpus | {train['ours_bpt']:.4f} | {train['hf_bpt']:.4f} | "
        f"{train['ours_bpt'] / train['hf_bpt']:.4f} |",
        f"| vocabulary | {train['ours_vocab']:,} | {train['hf_vocab']:,} | |",
        "",
        f"Encoding one {n_mb:.1f} MB string, single-threaded, MB/s (median / best of {REPEATS}); same ids:",
        "",
        "| tokenizer | scratchlm | HF tokenizers | scratchlm / HF (median) |",
        "|---|---|---|---|",
    ]
    for e in encodings:
        (o_med, o_best), (h_med, h_best) = e["ours_mbs"], e["hf_mbs"]
        lines.append(f"| {e['name']} | {o_med:.2f} / {o_best:.2f} | {h_med:.2f} / {h_best:.2f} | "
                     f"{o_med / h_med:.2f}x |")
    table = "\n".join(lines)
    print(table)

    if args.record:
        now = datetime.datetime.now(datetime.timezone.utc)
        header = (f"\n## Tokenizer: BPE training and encoding ({now:%Y-%m-%d %H:%M} UTC)\n\n"
                  f"Machine: {machine()}. {versions()}.\n"
                  f"Command: `.venv/bin/python benchmarks/tokenizer.py --record`\n\n")
        append_results(header + table + "\n")


if __name__ == "__main__":
    main()
