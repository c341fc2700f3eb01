"""Training a GPT from scratch: data preparation, the training loop, checkpoints, several processes.

    data.py         text -> token ids in memory-mapped binaries; random and fixed batches
    sources.py      reading a text file, a folder of .txt/.md files, or JSONL
    chars.py        the character-level tokenizer
    optim.py        AdamW with decay on matrices only; warm-up + cosine schedule
    loop.py         the training loop (shared with fine-tuning)
    checkpoint.py   atomic, resumable checkpoints that LLM.load reads
    distributed.py  DDP under torchrun
    report.py       progress bar, metrics.jsonl, loss.png, samples
    presets.py      named recipes (shakespeare-char, shakespeare-bpe)
    record.py       run.json: a run's resolved options, so --resume needs no flags
    run.py          the `scratchlm train` pipeline: corpus -> tokenizer -> data -> model -> train
"""
