"""Alignment: preference data, a reward model, DPO/IPO, PPO and GRPO on top of the fine-tuning loop.

    scratchlm align reward smollm2-135m-instruct --data prefs.jsonl --out runs/rm     # Bradley-Terry reward model
    scratchlm align score runs/rm/best --data prefs.jsonl                            # its rewards
    scratchlm align dpo smollm2-135m-instruct --data prefs.jsonl --beta 0.1 --out runs/dpo

Modules: ``data`` (preference JSONL -> token ids and batches), ``run`` (options, resume, report shared with
``finetune``), ``reward`` (reward model), ``dpo`` (DPO and IPO), ``cli`` (the ``scratchlm align`` command);
``ppo``, ``grpo``, ``rollout`` and ``rewards`` for reinforcement learning. The task head itself is
``scratchlm.heads``.
"""
