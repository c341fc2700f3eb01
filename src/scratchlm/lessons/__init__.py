"""The course's building blocks: small functions that the notebooks in ``notebooks/`` call, in teaching order.

    lookup.py       attention from a dictionary: a word-by-word translator, fuzzy keys (Levenshtein distance),
                    one-hot vectors so that a lookup is a matrix product, a softmax over cosine similarities
                    as a soft lookup
    attention.py    scaled dot-product attention written out (it equals torch's SDPA), with learned projections,
                    a causal mask, and a heat map of the weights
    cheating.py     a toy GPT that "cheats" without the causal mask: its training loss falls while its
                    generations are nonsense; the mask stops it
    word2vec.py     word embeddings: skip-gram with negative sampling and subsampling (Mikolov et al. 2013)
    autoencoder.py  word embeddings from an autoencoder that compresses each word's context counts
    vectors.py      word vectors: nearest neighbours, analogies, neighbour overlap between two embeddings

None of this is used by the rest of the package: it is the slow, explicit version of what ``model.py`` does
fast, written to be read and printed.
"""
