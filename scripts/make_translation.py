"""Write the bundled translation task to files: English number phrases and their French spelling.

    python scripts/make_translation.py --out data/numbers        # train.tsv, valid.tsv, test.tsv
    scratchlm seq2seq train data/numbers --out runs/numbers       # the same as `scratchlm seq2seq train`

Each line is ``source<TAB>target``, e.g. ``seventy-one thousand eighty<TAB>soixante et onze mille quatre-vingts``.
The rules and the split live in ``scratchlm.seq2seq.numbers``: every number from 0 to 999,999 belongs to one split
for good (a checksum of its digits: 85% train, 5% valid, 10% test), so no test number occurs in training; the
digit count of each drawn number is uniform over 1-6. The same seed writes the same files, and the defaults
write exactly the pairs `scratchlm seq2seq train` uses when it is given no data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from scratchlm.seq2seq.numbers import DEFAULT_SIZES, SPLITS, default_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/numbers", help="folder for train.tsv, valid.tsv and test.tsv")
    for split in SPLITS:
        parser.add_argument(f"--{split}", type=int, default=DEFAULT_SIZES[split],
                            help=f"{split} pairs (default {DEFAULT_SIZES[split]:,})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    task = default_task(args.seed, {split: getattr(args, split) for split in SPLITS})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, pairs in task.items():
        (out / f"{split}.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    print(f"wrote {', '.join(f'{len(p):,} {s}' for s, p in task.items())} pairs to {out}")


if __name__ == "__main__":
    main()
