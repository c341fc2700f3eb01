"""``scratchlm data ...``: clean a corpus for pretraining; list the quality rules.

    scratchlm data clean crawl/ extra.jsonl --out clean/          # exact + near dedup, Gopher rules, shards
    scratchlm data clean notes/ --out clean/ --rule min_words=20 --rule max_dup_5gram=off
    scratchlm data clean zh.jsonl --out clean/ --language-agnostic --shingle-unit char --rule min_words=off
    scratchlm data rules                                           # every rule, its default and what it reads
    scratchlm train clean/ --preset shakespeare-bpe                # train on the shards

Parsing only: each command calls ``scratchlm.data``.
"""

from __future__ import annotations

import argparse
import json

from scratchlm.cli_options import add_force_flag, add_progress_flag, show_progress


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``data`` subcommand and its verbs."""
    examples = __doc__.split("\n\n", 1)[1].split("\n\nParsing")[0]
    p = sub.add_parser("data", help="curate training text: deduplicate, filter, shard",
                       epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="data_command", required=True, metavar="VERB")

    c = verbs.add_parser("clean", help="deduplicate (exact and MinHash near-duplicates), apply the Gopher "
                                       "quality rules, write JSONL shards and a report",
                         epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("inputs", nargs="+", metavar="IN", help="text files (one document each), folders of "
                   ".txt/.md/.jsonl files, or .jsonl files (one document per line)")
    c.add_argument("--out", required=True, help="output folder: part-NNNNN.jsonl shards and report.json")
    c.add_argument("--text-field", default="text", help="JSONL field holding the text (default 'text')")
    c.add_argument("--shard-docs", type=int, default=10_000, help="documents per output shard (default 10000)")
    c.add_argument("--examples", type=int, default=3, help="removed documents shown per filter (default 3)")
    c.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    add_force_flag(c)
    add_progress_flag(c)

    g = c.add_argument_group("deduplication")
    g.add_argument("--no-exact", action="store_true", help="keep exact duplicates (of the normalised text)")
    g.add_argument("--no-near", action="store_true", help="keep near-duplicates (no MinHash/LSH)")
    g.add_argument("--threshold", type=float, default=0.8,
                   help="Jaccard similarity of shingle sets above which a document is a near-duplicate (0.8)")
    g.add_argument("--shingle-size", type=int, default=5, help="words (or characters) per shingle (default 5)")
    g.add_argument("--shingle-unit", choices=["word", "char"], default="word",
                   help="shingles of words (default) or of characters (scripts without spaces)")
    g.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (default 128)")
    g.add_argument("--bands", type=int, default=None, help="LSH bands (default: chosen from --threshold)")
    g.add_argument("--rows", type=int, default=None, help="LSH rows per band (default: chosen from --threshold)")
    g.add_argument("--verify", action="store_true",
                   help="remove an LSH candidate only when its estimated similarity reaches --threshold (more "
                        "precise; 4 bytes per permutation per kept document)")
    g.add_argument("--seed", type=int, default=1, help="seed of the MinHash permutations (default 1)")

    g = c.add_argument_group("quality (the Gopher rules, Rae et al. 2021; see `scratchlm data rules`)")
    g.add_argument("--no-quality", action="store_true", help="apply no quality rule")
    g.add_argument("--rule", action="append", default=[], metavar="NAME=VALUE",
                   help="change one rule's threshold, or turn it off with NAME=off (repeatable)")
    g.add_argument("--stop-words", default=None,
                   help="comma-separated stop words for min_stop_words (default Gopher's English eight)")
    g.add_argument("--language-agnostic", action="store_true",
                   help="turn off the rules that assume English: stop words and mean word length")
    c.set_defaults(func=cmd_clean)

    r = verbs.add_parser("rules", help="list the quality rules with their default thresholds")
    r.set_defaults(func=cmd_rules)


def quality_rules(args: argparse.Namespace):
    """The QualityRules the flags describe (None with --no-quality)."""
    from scratchlm.data.quality import QualityRules, language_agnostic, parse_rule

    if args.no_quality:
        return None
    rules = QualityRules()
    if args.language_agnostic:
        rules = language_agnostic(rules)
    if args.stop_words is not None:
        rules = rules.replace(stop_words=tuple(w.strip() for w in args.stop_words.split(",") if w.strip()))
    changes = dict(parse_rule(spec) for spec in args.rule)
    return rules.replace(**changes) if changes else rules


def cmd_clean(args: argparse.Namespace) -> None:
    from scratchlm.data.clean import CleanOptions, clean_corpus, format_report

    options = CleanOptions(
        exact=not args.no_exact, near=not args.no_near, threshold=args.threshold, shingle_size=args.shingle_size,
        shingle_unit=args.shingle_unit, num_perm=args.num_perm, bands=args.bands, rows=args.rows, verify=args.verify,
        seed=args.seed, quality=quality_rules(args), text_field=args.text_field, shard_docs=args.shard_docs,
        examples=args.examples)
    report = clean_corpus(args.inputs, args.out, options, force=args.force, progress=show_progress(args))
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(format_report(report))
        print(f"wrote {report['documents_kept']:,} documents in {len(report['shards'])} shard(s) to {args.out} "
              f"(report: {args.out}/report.json); train on them with `scratchlm train {args.out}`")


def cmd_rules(args: argparse.Namespace) -> None:
    from scratchlm.data.quality import DESCRIPTIONS, QualityRules, rule_names

    defaults = QualityRules()
    print(f"{'rule':<26} {'default':>8}  removes a document when")
    for name in rule_names():
        print(f"{name:<26} {getattr(defaults, name):>8g}  {DESCRIPTIONS[name]}")
    print("change one with --rule NAME=VALUE, turn it off with --rule NAME=off; stop words: "
          + ", ".join(defaults.stop_words))
