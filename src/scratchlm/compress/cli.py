"""``scratchlm prune`` and ``scratchlm distill``: the command lines of ``compress.pipeline`` and ``compress.distill``.

    scratchlm prune MODEL --method magnitude|wanda --sparsity 0.5 [--calibration FILE] --out DIR
    scratchlm prune MODEL --method wanda --structure 2:4 --out DIR
    scratchlm prune MODEL --method structured --heads 0.34 --mlp 0.4 --out DIR
    scratchlm distill --teacher MODEL --student MODEL_OR_CONFIG --data TEXT --out DIR [--resume]
"""

from __future__ import annotations

import argparse

from scratchlm.cli_options import add_force_flag, add_progress_flag, add_threads_flag, show_progress


def cmd_prune(args: argparse.Namespace) -> None:
    from scratchlm.compress.pipeline import prune_to_directory, summary_lines
    from scratchlm.compress.prune import parse_structure

    result = prune_to_directory(args.model, args.out, args.method, args.sparsity, parse_structure(args.structure),
                                args.heads, args.mlp, args.calibration, args.samples, args.seq_len, args.force,
                                show_progress(args))
    for line in summary_lines(result):
        print(line)
    print(f"wrote {result.out} in {result.seconds:.1f} s (per-layer report: {result.out / 'pruning.json'}); "
          f"try it: scratchlm eval perplexity {result.out} TEXT_FILE, or scratchlm chat {result.out}")


def cmd_distill(args: argparse.Namespace) -> None:
    from scratchlm.compress.distill import DistillOptions, run_distill

    opts = DistillOptions(
        teacher=args.teacher, student=args.student, data=args.data, out=args.out, temperature=args.temperature,
        alpha=args.alpha, top_k=args.top_k, teacher_cache=args.teacher_cache, max_steps=args.max_steps,
        batch_size=args.batch_size, grad_accum_steps=args.grad_accum_steps, context_length=args.context_length,
        lr=args.lr, warmup_steps=args.warmup_steps, eval_interval=args.eval_interval, dtype=args.dtype,
        seed=args.seed, resume=args.resume, force=args.force, progress=show_progress(args))
    run_distill(opts)


def register(subparsers) -> None:
    p = subparsers.add_parser("prune", help="zero weights (magnitude, Wanda, 2:4) or remove heads and MLP channels",
                              description="Prune a model and write it as a model directory with pruning.json. "
                                          "magnitude/wanda zero the least important weights of each output row of "
                                          "every block linear layer (the zeros are stored; shapes stay); "
                                          "structured removes whole attention heads (by key/value group) and MLP "
                                          "channels and writes a smaller model.")
    p.add_argument("model", help="known model name, .gguf file, or model directory")
    p.add_argument("--method", required=True, choices=["magnitude", "wanda", "structured"],
                   help="magnitude: |W|; wanda: |W| x input norm (needs calibration text); structured: whole heads "
                        "and channels ranked by activations")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of weights to zero, in [0, 1)")
    p.add_argument("--structure", default=None, metavar="N:M",
                   help="semi-structured: keep N of every M consecutive weights (2:4 implies sparsity 0.5)")
    p.add_argument("--heads", type=float, default=None, metavar="F",
                   help="structured: fraction of attention heads (key/value groups) to remove")
    p.add_argument("--mlp", type=float, default=None, metavar="F",
                   help="structured: fraction of MLP channels to remove")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="text for wanda and structured (default: the bundled Shakespeare)")
    p.add_argument("--samples", type=int, default=None, help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per calibration window (default 512)")
    p.add_argument("--out", required=True, help="output model directory")
    add_force_flag(p)
    add_threads_flag(p)
    add_progress_flag(p)
    p.set_defaults(func=cmd_prune)

    p = subparsers.add_parser("distill", help="train a student model on a teacher's soft targets (and the text)",
                              description="Knowledge distillation: alpha * T^2 * KL(teacher_T || student_T) + "
                                          "(1 - alpha) * cross-entropy, in the training loop (checkpoints, resume, "
                                          "metrics.jsonl, loss.png). The student is a model with the teacher's "
                                          "tokenizer (e.g. from `scratchlm prune --method structured`: Minitron) or "
                                          "an architecture (a preset name or a model_config .json) started at random.")
    p.add_argument("--teacher", default=None, help="the teacher: known model name, .gguf file or model directory")
    p.add_argument("--student", default=None, metavar="MODEL_OR_CONFIG",
                   help="a model (name, file, directory) or an architecture (preset name or config .json)")
    p.add_argument("--data", default=None, help="training text: a file, a folder, or JSONL")
    p.add_argument("--out", required=True, help="run directory (best/, last/, metrics.jsonl, loss.png, run.json)")
    p.add_argument("--temperature", type=float, default=None, help="softening temperature T (default 2)")
    p.add_argument("--alpha", type=float, default=None,
                   help="weight of the teacher's soft targets; 1 - alpha goes to the cross-entropy (default 0.5)")
    p.add_argument("--top-k", type=int, default=None, help="use only the teacher's k most likely tokens")
    p.add_argument("--teacher-cache", default=None, metavar="DIR",
                   help="keep the teacher's top-k per batch here and reuse it (needs --top-k)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 8)")
    p.add_argument("--grad-accum-steps", type=int, default=None, help="micro-batches per step (default 1)")
    p.add_argument("--context-length", type=int, default=None, help="tokens per sequence (default min(512, model))")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 3e-4 for a loaded student, 1e-3 for a new one)")
    p.add_argument("--warmup-steps", type=int, default=None, help="default 5%% of the steps")
    p.add_argument("--eval-interval", type=int, default=None, help="default: 5 evaluations per run")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="training precision")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_force_flag(p)
    add_threads_flag(p)
    add_progress_flag(p)
    p.set_defaults(func=cmd_distill)
