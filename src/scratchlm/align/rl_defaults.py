"""The options of ``scratchlm align ppo|grpo`` and their defaults per algorithm.

Apart from ``rl.py`` so that the command's parser (``rl_cli.py``) can show the defaults without importing torch.
"""

ALGORITHMS = ("ppo", "grpo")
# Defaults per algorithm; None in RLOptions means "this default" (or the recorded value on --resume).
COMMON = dict(val_prompts=None, val_fraction=0.1, epochs=None, max_steps=None, grad_accum_steps=1, lr=5e-5,
              warmup_steps=0, weight_decay=0.0, rank=8, alpha=16.0, dropout=0.0, targets="q,k,v,o,gate,up,down",
              max_new_tokens=64, temperature=1.0, top_k=None, top_p=None, max_prompt_length=256, clip=0.2,
              eval_interval=None, max_eval_prompts=64, dtype="float32", activation_checkpointing=False,
              seed=0)
DEFAULTS = {
    "ppo": {**COMMON, "batch_size": 16, "group_size": 1, "ppo_epochs": 4, "minibatch_size": 8, "kl_coef": 0.05,
            "value_clip": 0.2, "vf_coef": 0.1, "gamma": 1.0, "lam": 0.95, "whiten_rewards": True},
    "grpo": {**COMMON, "batch_size": 4, "group_size": 8, "ppo_epochs": 1, "minibatch_size": 32, "kl_coef": 0.04,
             "value_clip": None, "vf_coef": None, "gamma": None, "lam": None, "whiten_rewards": None},
}
