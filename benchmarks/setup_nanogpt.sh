#!/usr/bin/env bash
# Get karpathy/nanoGPT for benchmarks/train.py: a clone OUTSIDE this repository (its code is never committed here).
#   bash benchmarks/setup_nanogpt.sh [DIR]      (default DIR: ../peers/nanoGPT next to this checkout)
# nanoGPT's train.py needs only torch and numpy, which the scratchlm venv already has.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-$here/../peers/nanoGPT}"
case "$(cd "$(dirname "$dir")" 2>/dev/null && pwd)/" in
  "$here"/*) echo "refusing to put nanoGPT inside this repository ($dir): choose a folder outside it" >&2; exit 2;;
esac
if [ -f "$dir/train.py" ]; then
  echo "nanoGPT already at $dir ($(git -C "$dir" rev-parse --short HEAD 2>/dev/null || echo 'not a git clone'))"
else
  mkdir -p "$(dirname "$dir")"
  git clone --depth 1 https://github.com/karpathy/nanoGPT "$dir"
fi
echo "next: python benchmarks/train.py --nanogpt $dir"
