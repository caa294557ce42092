"""SQuAD evaluation: spans from start/end logits, then the official EM and F1.

The scores follow the official evaluation scripts exactly: answers are lower-cased and
stripped of punctuation, the articles a/an/the and extra whitespace; each prediction takes
the maximum over its gold answers; results are percentages. The one difference between the
v1.1 and v2.0 scripts is F1 when a normalised answer is empty: v1.1 scores 0 (no common token),
v2.0 scores 1 if both are empty. torchmetrics' ``SQuAD`` uses the v2.0 rule everywhere, so it
does not reproduce v1.1 numbers (3 of the 10,570 v1.1 dev questions normalise to empty), and
this module implements both.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, articles and extra whitespace (the official ``normalize_answer``)."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str, version_2: bool = False) -> float:
    """Token-overlap F1 of the normalised answers, by the v1.1 or the v2.0 script's rule."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if version_2 and (not predicted or not expected):
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: dict[str, str], golds: dict[str, list[str]], version_2: bool = False) -> dict[str, float]:
    """Official ``exact_match`` and ``f1`` in percent over every question in ``golds``.

    A question without a prediction scores 0, as in the official script. For v2.0, an
    unanswerable question has the gold answer list ``[""]``.
    """
    em_total = f1_total = 0.0
    for qid, answers in golds.items():
        prediction = predictions.get(qid)
        if prediction is None:
            continue
        em_total += max(exact_match(prediction, gold) for gold in answers)
        f1_total += max(f1(prediction, gold, version_2) for gold in answers)
    count = max(len(golds), 1)
    return {"exact_match": 100.0 * em_total / count, "f1": 100.0 * f1_total / count}


@dataclass(frozen=True)
class FeatureSpan:
    """What post-processing needs of one tokenized feature (a window over one example's context)."""

    example_index: int
    offsets: list[tuple[int, int] | None]  # character span of each token; None outside the context


def best_span(
    features: list[tuple[FeatureSpan, torch.Tensor, torch.Tensor]],
    context: str,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> tuple[str, float]:
    """The highest-scoring valid span over all features of one example, and its score.

    Valid: both ends inside the context, ``start <= end``, at most ``max_answer_length`` tokens.
    Candidates are the ``n_best`` best starts times the ``n_best`` best ends of each feature.
    """
    best_text, best_score = "", float("-inf")
    for feature, start_logits, end_logits in features:
        starts = start_logits.topk(min(n_best, start_logits.numel())).indices.tolist()
        ends = end_logits.topk(min(n_best, end_logits.numel())).indices.tolist()
        for start in starts:
            for end in ends:
                if end < start or end - start + 1 > max_answer_length:
                    continue
                if start >= len(feature.offsets) or end >= len(feature.offsets):
                    continue
                if feature.offsets[start] is None or feature.offsets[end] is None:
                    continue
                score = float(start_logits[start] + end_logits[end])
                if score > best_score:
                    best_score = score
                    best_text = context[feature.offsets[start][0] : feature.offsets[end][1]]
    return best_text, best_score


def null_score(features: list[tuple[FeatureSpan, torch.Tensor, torch.Tensor]]) -> float:
    """The lowest "no answer" score (CLS start + CLS end) over an example's features (v2.0)."""
    return min(float(start[0] + end[0]) for _, start, end in features)


class SquadMetric(Metric):
    """EM and F1 of SQuAD predictions built from start/end logits of every evaluation feature.

    ``update(feature_index, start_logits, end_logits)`` accumulates per feature (states are
    gathered across processes); ``compute()`` groups features by example, picks spans and
    scores them with the official rules. The feature and example tables are the datamodule's.
    """

    full_state_update = False

    def __init__(
        self,
        features: list[FeatureSpan],
        examples: dict[str, list],
        version_2: bool = False,
        n_best: int = 20,
        max_answer_length: int = 30,
        null_threshold: float = 0.0,
        max_length: int = 384,
    ) -> None:
        super().__init__()
        self.max_length = max_length
        self.features, self.examples = features, examples
        self.version_2, self.n_best, self.max_answer_length = version_2, n_best, max_answer_length
        self.null_threshold = null_threshold
        self.add_state("feature_index", default=[], dist_reduce_fx="cat")
        self.add_state("start_logits", default=[], dist_reduce_fx="cat")
        self.add_state("end_logits", default=[], dist_reduce_fx="cat")

    def update(self, feature_index: torch.Tensor, start_logits: torch.Tensor, end_logits: torch.Tensor) -> None:
        self.feature_index.append(feature_index)
        # pad every batch to max_length so batches (and processes) concatenate; padded positions
        # lie outside every feature's offsets and are never chosen
        pad = self.max_length - start_logits.shape[-1]
        self.start_logits.append(F.pad(start_logits.float(), (0, pad), value=-1e4))
        self.end_logits.append(F.pad(end_logits.float(), (0, pad), value=-1e4))

    def predictions(self) -> dict[str, str]:
        """Answer text per question id."""
        grouped: dict[int, list] = {}
        indices = dim_zero_cat(self.feature_index).tolist()
        starts, ends = dim_zero_cat(self.start_logits), dim_zero_cat(self.end_logits)
        for index, start, end in zip(indices, starts, ends):
            feature = self.features[index]
            grouped.setdefault(feature.example_index, []).append((feature, start, end))
        predictions = {}
        for example_index, features in grouped.items():
            context = self.examples["context"][example_index]
            text, score = best_span(features, context, self.n_best, self.max_answer_length)
            if self.version_2 and null_score(features) - score > self.null_threshold:
                text = ""
            predictions[self.examples["id"][example_index]] = text
        return predictions

    def compute(self) -> dict[str, torch.Tensor]:
        golds = {qid: answers["text"] or [""] for qid, answers in zip(self.examples["id"], self.examples["answers"])}
        scores = squad_scores(self.predictions(), golds, self.version_2)
        return {name: torch.tensor(value) for name, value in scores.items()}
