"""Measuring generated digits with a separate judge: a logistic regression trained on the real 8x8 digits.

    judge = DigitJudge.fit()                  # scikit-learn, on the training split of the real digits
    judge.predict(samples)                    # samples [N, 1, 16, 16] in [-1, 1] -> digits [N]
    judge.accuracy(judge.test.images)         # its accuracy on the real held-out digits (about 0.96)

The judge never sees a generated image while it learns, so "the judge reads the requested digit" is evidence that
the model drew it. Generated images are brought back to the judge's 8x8 ink scale by 2x2 averaging.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scratchlm.errors import UnsupportedError
from scratchlm.vision.digits import digits_split


def to_ink(images: torch.Tensor, size: int = 8) -> torch.Tensor:
    """Images [N, 1, S, S] in [-1, 1] (model space) as ink [N, size, size] in [0, 1]."""
    ink = ((images.float() + 1) / 2).clamp(0, 1)
    if ink.shape[-1] != size:
        ink = F.adaptive_avg_pool2d(ink, size)
    return ink[:, 0]


class DigitJudge:
    """A multinomial logistic regression over the 64 pixels of the real digits' training split."""

    def __init__(self, classifier, test):
        self.classifier, self.test = classifier, test

    @classmethod
    def fit(cls, seed: int = 0) -> DigitJudge:
        try:
            from sklearn.linear_model import LogisticRegression
        except ImportError:
            raise UnsupportedError("the judge of generated digits is scikit-learn's logistic regression: "
                                   "pip install 'scratchlm[vision]'") from None
        train, test = digits_split(seed=seed)
        classifier = LogisticRegression(max_iter=2000)
        classifier.fit(train.images.flatten(1).numpy(), train.labels.numpy())
        return cls(classifier, test)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The digit the judge reads in each image: model-space [N, 1, S, S] or ink [N, 8, 8]."""
        ink = to_ink(images) if images.dim() == 4 else images
        return torch.as_tensor(self.classifier.predict(ink.flatten(1).numpy()))

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> float:
        """Share of ``images`` read as ``labels`` (default: the held-out real digits and their labels)."""
        labels = self.test.labels if labels is None else labels
        return float((self.predict(images) == labels).float().mean())
