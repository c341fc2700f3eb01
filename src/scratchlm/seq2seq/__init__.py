"""The encoder-decoder translator (Vaswani et al. 2017), built from ``scratchlm.model``'s blocks.

    model.py       Seq2SeqConfig, Seq2Seq (bidirectional encoder, causal decoder with cross-attention)
    positions.py   sinusoidal position encodings (also for diffusion timesteps)
    search.py      greedy and beam search
    data.py        parallel text, tokenizers, batches for the shared training loop
    numbers.py     the bundled task: English number phrases into French
    translator.py  Translator: load, translate, BLEU; the files on disk
    run.py, cli.py `scratchlm seq2seq train|translate|bleu`
"""

from scratchlm.lazy import lazy_exports

# Loaded on first use, so that `scratchlm --help` (which imports seq2seq/cli.py) does not import torch.
_EXPORTS = {"Seq2Seq": "model", "Seq2SeqConfig": "model", "Translator": "translator", "beam_search": "search",
            "greedy_search": "search", "sinusoidal_encoding": "positions", "sinusoidal_table": "positions"}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
