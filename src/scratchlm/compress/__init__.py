"""Model compression by removing weights and by teaching a smaller model (GPTQ and QAT live in ``quant/``).

    prune.py       unstructured and N:M pruning: magnitude and Wanda scores, per output row
    structured.py  structured pruning: whole attention heads (key/value groups) and MLP channels -> a smaller model
    pipeline.py    ``scratchlm prune``: load, calibrate, prune, write a model directory with pruning.json
    distill.py     knowledge distillation: soft-target KL (T^2-scaled) + cross-entropy in the training loop
    cli.py         the ``prune`` and ``distill`` subcommands
"""
