"""Fine-tuning a pretrained model on conversations: LoRA, QLoRA and full, through the pre-training loop.

    lora.py    LoRA layers (A, B, alpha/r, dropout, B = 0 at the start), applying, merging
    nf4.py     QLoRA's frozen base: NF4 weights with double quantization, input gradients on any device
    peft.py    adapters in HF PEFT's format (adapter_config.json + adapter_model.safetensors), base checks
    data.py    chat / prompt-completion JSONL -> token ids with assistant-only targets; padded batches
    run.py     the `scratchlm finetune` pipeline (model + method + data -> train.loop.train)
    merge.py   base + adapter -> one model directory (`scratchlm merge`)
    cli.py     the `finetune` and `merge` subcommands
"""
