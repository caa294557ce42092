"""E2E NLG evaluation: BLEU, NIST, METEOR, ROUGE-L and CIDEr, multi-reference, as the E2E
challenge's script (``measure_scores.py`` of tuetschek/e2e-metrics) defines them.

* BLEU and NIST follow mteval-v13a (the challenge's ``mteval-v13a-sig.pl``): 13a tokenization
  with only A–Z lower-cased (the script's ``tr/[A-Z]/[a-z]/``: "É" stays "É", so it does not
  match "é"), corpus statistics. BLEU is sacrebleu's on those tokens (closest reference
  length with ties to the shorter, the mteval "exp" smoothing); NIST, which sacrebleu lacks,
  is implemented here (Doddington 2002, eqs. 2–3, the script's length penalty and its
  average reference length over the non-empty references).
* METEOR, ROUGE-L and CIDEr follow the MS-COCO caption scripts the challenge uses, on
  lower-cased tokens with punctuation removed. METEOR is the official METEOR 1.5 jar
  (``-l en -norm``), run through ``pycocoevalcap`` when it and Java are installed; without
  them it is not reported. ROUGE-L is the LCS F-measure with β = 1.2, maximum precision and
  recall over the references, averaged over MRs; CIDEr is coco-caption's CIDEr-D (eq. of
  Vedantam et al. 2015 with clipping, Gaussian length penalty σ = 6, ×10, document
  frequencies over the evaluated references).

The COCO scripts tokenize with Stanford's Java PTBTokenizer; :func:`coco_tokenize` is a
regular-expression approximation of it (docs/datamodules.md gives the measured difference).
Scales are the papers': BLEU, METEOR and ROUGE-L in percent, NIST and CIDEr as they are.
"""

from __future__ import annotations

import importlib.util
import math
import re
import shutil
import string
from collections import Counter

import torch
from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

_MTEVAL = Tokenizer13a()
_CLITIC = re.compile(r"(\w)(n't|'(?:s|re|ll|d|ve|m))\b")
_COCO_TOKEN = re.compile(r"n't|'(?:s|re|ll|d|ve|m)\b|\d+(?:[.,]\d+)+(?:-\w+)*|\w+(?:[-'/&]\w+)*|\S")
# PTBTokenizer's punctuation tokens that the COCO scripts drop, plus the raw characters the
# PTBTokenizer would have turned into them (quotes, brackets)
_COCO_PUNCTUATION = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"} | set('"()[]{}')
_SEPARATOR = "\x1f"  # joins the references of one MR in a byte state
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def mteval_tokenize(text: str) -> list[str]:
    """mteval-v13a tokens, lower-cased as the Perl script does: A–Z only, after its entity
    conversion (``&QUOT;`` is not ``&quot;``). Casing does not affect the 13a punctuation rules,
    so lower-casing the tokens is lower-casing where the script does."""
    return _MTEVAL(text).translate(_ASCII_LOWER).split()


def coco_tokenize(text: str) -> list[str]:
    """Lower-cased PTB-style tokens without punctuation (an approximation of the COCO scripts')."""
    text = _CLITIC.sub(r"\1 \2", text.lower().replace("£", "#"))  # PTB writes the pound sign as #
    return [token for token in _COCO_TOKEN.findall(text) if token not in _COCO_PUNCTUATION]


def ngram_counts(tokens: list[str], max_n: int) -> Counter:
    """Counts of every n-gram (as a tuple), 1 <= n <= ``max_n``."""
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


def bleu(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 in percent, as mteval-v13a (lower-casing A–Z) computes it."""
    hyps = [" ".join(mteval_tokenize(text)) for text in hypotheses]
    refs = [[" ".join(mteval_tokenize(text)) for text in texts] for texts in references]
    streams = [[texts[i] if i < len(texts) else None for texts in refs] for i in range(max(map(len, refs)))]
    return BLEU(tokenize="none", force=True).corpus_score(hyps, streams).score  # force: tokenized on purpose


def nist(hypotheses: list[str], references: list[list[str]], max_n: int = 5) -> float:
    """Corpus NIST-5 as mteval-v13a computes it (Doddington 2002, eqs. 2 and 3).

    ``Info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn))`` over all references; the score
    sums, per order, the information of clipped matches over the hypothesis n-gram count, times
    ``exp(-β log²(L_sys / L_ref))`` when shorter, with β such that a ratio 1.5 scores 0.5 and
    ``L_ref`` the total reference length over the average number of references per MR.
    """
    hyp_tokens = [mteval_tokenize(text) for text in hypotheses]
    ref_tokens = [[mteval_tokenize(text) for text in refs] for refs in references]
    corpus = Counter()
    for refs in ref_tokens:
        for ref in refs:
            corpus.update(ngram_counts(ref, max_n))
            corpus[()] += len(ref)
    matched, totals = [0.0] * max_n, [0] * max_n
    for hyp, refs in zip(hyp_tokens, ref_tokens):
        best = Counter()
        for ref in refs:
            best |= ngram_counts(ref, max_n)
        for gram, count in ngram_counts(hyp, max_n).items():
            if gram in best:
                matched[len(gram) - 1] += math.log2(corpus[gram[:-1]] / corpus[gram]) * min(count, best[gram])
        for n in range(max_n):
            totals[n] += max(len(hyp) - n, 0)
    score = sum(info / max(total, 1) for info, total in zip(matched, totals))
    refs_per_mr = sum(len(refs) for refs in ref_tokens) / len(ref_tokens)
    ratio = totals[0] / (corpus[()] / refs_per_mr)
    beta = -math.log(0.5) / math.log(1.5) ** 2
    penalty = 1.0 if ratio >= 1 else 0.0 if ratio <= 0 else math.exp(-beta * math.log(ratio) ** 2)
    return score * penalty


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(hypotheses: list[list[str]], references: list[list[list[str]]], beta: float = 1.2) -> float:
    """ROUGE-L in percent as coco-caption computes it: per MR, ``F = (1+β²)PR / (R + β²P)`` with
    P and R the maximum LCS precision and recall over its references; the mean over MRs."""
    total = 0.0
    for hyp, refs in zip(hypotheses, references):
        lcs = [lcs_length(ref, hyp) for ref in refs]
        precision = max(length / max(len(hyp), 1) for length in lcs)
        recall = max(length / max(len(ref), 1) for length, ref in zip(lcs, refs))
        if precision and recall:
            total += (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
    return 100.0 * total / len(hypotheses)


def _tfidf(tokens: list[str], n: int, document_frequency: Counter, log_documents: float) -> list[dict]:
    vectors: list[dict] = [{} for _ in range(n)]
    for gram, count in ngram_counts(tokens, n).items():
        vectors[len(gram) - 1][gram] = count * (log_documents - math.log(max(1.0, document_frequency[gram])))
    return vectors


def cider_d(hypotheses: list[list[str]], references: list[list[list[str]]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D as coco-caption computes it (Vedantam et al. 2015, eqs. 1–4 with the -D changes).

    TF-IDF n-gram vectors (document frequency: in how many MRs' reference sets an n-gram
    occurs); per order, the cosine of the hypothesis vector clipped by each reference's,
    times ``exp(-(len_h - len_r)² / 2σ²)``; averaged over orders and references, times 10;
    the mean over MRs.
    """
    document_frequency = Counter()
    for refs in references:
        document_frequency.update({gram for ref in refs for gram in ngram_counts(ref, n)})
    log_documents = math.log(len(references))
    total = 0.0
    for hyp, refs in zip(hypotheses, references):
        hyp_vectors = _tfidf(hyp, n, document_frequency, log_documents)
        for ref in refs:
            ref_vectors = _tfidf(ref, n, document_frequency, log_documents)
            # coco-caption measures length in bigrams (len - 1); it differs only for empty outputs
            penalty = math.exp(-((max(len(hyp) - 1, 0) - max(len(ref) - 1, 0)) ** 2) / (2 * sigma**2))
            for h, r in zip(hyp_vectors, ref_vectors):
                dot = sum(min(value, r.get(gram, 0.0)) * r.get(gram, 0.0) for gram, value in h.items())
                norms = math.sqrt(sum(v * v for v in h.values())) * math.sqrt(sum(v * v for v in r.values()))
                total += 10.0 * penalty * (dot / norms if norms else dot) / (n * len(refs))
    return total / len(hypotheses)


def meteor_available() -> bool:
    """Whether the official METEOR 1.5 can run: ``pycocoevalcap`` installed and ``java`` on PATH."""
    return importlib.util.find_spec("pycocoevalcap") is not None and shutil.which("java") is not None


def meteor(hypotheses: list[list[str]], references: list[list[list[str]]]) -> float:
    """Corpus METEOR 1.5 (``-l en -norm``) in percent, from the official jar shipped in pycocoevalcap."""
    from pycocoevalcap.meteor.meteor import Meteor

    gold = {i: [" ".join(ref) for ref in refs] for i, refs in enumerate(references)}
    predicted = {i: [" ".join(hyp)] for i, hyp in enumerate(hypotheses)}
    score, _ = Meteor().compute_score(gold, predicted)
    return 100.0 * score


def e2e_scores(hypotheses: list[str], references: list[list[str]], with_meteor: bool = True) -> dict[str, float]:
    """The challenge's five metrics for one output per MR (METEOR only where it can run)."""
    hyp_tokens = [coco_tokenize(text) for text in hypotheses]
    ref_tokens = [[coco_tokenize(text) for text in refs] for refs in references]
    scores = {
        "bleu": bleu(hypotheses, references), "nist": nist(hypotheses, references),
        "rouge_l": rouge_l(hyp_tokens, ref_tokens), "cider": cider_d(hyp_tokens, ref_tokens),
    }
    if with_meteor and meteor_available():
        scores["meteor"] = meteor(hyp_tokens, ref_tokens)
    return scores


def _to_bytes(texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [text.encode("utf-8") for text in texts]
    data = torch.frombuffer(bytearray(b"".join(encoded)), dtype=torch.uint8) if any(encoded) else torch.zeros(0)
    lengths = torch.tensor([len(item) for item in encoded], dtype=torch.long, device=device)
    return data.to(device=device, dtype=torch.uint8), lengths


def _from_bytes(data: list[torch.Tensor], lengths: list[torch.Tensor]) -> list[str]:
    raw = dim_zero_cat(data).cpu().numpy().tobytes()
    texts, start = [], 0
    for length in dim_zero_cat(lengths).tolist():
        texts.append(raw[start : start + length].decode("utf-8"))
        start += length
    return texts


class E2EMetric(Metric):
    """The E2E challenge's metrics over generated outputs, one per MR.

    ``update(example_index, hypotheses, references)`` stores the texts as UTF-8 byte tensors
    (so states gather across processes); ``compute()`` keeps one output per MR (a distributed
    sampler may repeat some) and scores them with :func:`e2e_scores`.

    Args:
        with_meteor: report METEOR when pycocoevalcap and Java are installed.
    """

    full_state_update = False

    def __init__(self, with_meteor: bool = True) -> None:
        super().__init__()
        self.with_meteor = with_meteor
        for name in ("example_index", "hypothesis_bytes", "hypothesis_lengths", "reference_bytes", "reference_lengths"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, example_index: torch.Tensor, hypotheses: list[str], references: list[list[str]]) -> None:
        self.example_index.append(example_index)
        data, lengths = _to_bytes(hypotheses, example_index.device)
        self.hypothesis_bytes.append(data)
        self.hypothesis_lengths.append(lengths)
        data, lengths = _to_bytes([_SEPARATOR.join(refs) for refs in references], example_index.device)
        self.reference_bytes.append(data)
        self.reference_lengths.append(lengths)

    def outputs(self) -> dict[int, tuple[str, list[str]]]:
        """``{example index: (hypothesis, references)}`` of everything seen so far."""
        hypotheses = _from_bytes(self.hypothesis_bytes, self.hypothesis_lengths)
        references = _from_bytes(self.reference_bytes, self.reference_lengths)
        seen: dict[int, tuple[str, list[str]]] = {}
        for index, hypothesis, refs in zip(dim_zero_cat(self.example_index).tolist(), hypotheses, references):
            seen.setdefault(index, (hypothesis, refs.split(_SEPARATOR)))
        return dict(sorted(seen.items()))

    def compute(self) -> dict[str, torch.Tensor]:
        pairs = list(self.outputs().values())
        scores = e2e_scores([h for h, _ in pairs], [refs for _, refs in pairs], self.with_meteor)
        return {name: torch.tensor(value) for name, value in scores.items()}
