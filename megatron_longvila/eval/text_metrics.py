"""Reference-based caption metrics, computed locally: BLEU-4, ROUGE-L and CIDEr-D.

Text is lower-cased and split into words and punctuation marks (:func:`tokenize`). Each
candidate has one or more references.

* BLEU-4 (Papineni et al. 2002), corpus level: clipped 1..4-gram precisions summed over the
  corpus, geometric mean, brevity penalty against the reference closest in length.
* ROUGE-L (Lin 2004): longest common subsequence F-measure with β = 1.2 (as the COCO caption
  toolkit), the best reference per candidate, averaged over candidates.
* CIDEr-D (Vedantam et al. 2015): TF-IDF vectors of 1..4-grams, document frequencies over the
  references of this corpus, candidate counts clipped to the reference's, a Gaussian length
  penalty (σ = 6), averaged over references and n, times 10.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _check(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
    empty = [i for i, refs in enumerate(references) if not refs]
    if empty:
        raise ValueError(f"candidates {empty[:5]} have no reference")


def bleu4(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 in [0, 1] (0 when some n-gram order has no match)."""
    _check(candidates, references)
    matched, total = [0] * 4, [0] * 4
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, references):
        c = tokenize(cand)
        r = [tokenize(x) for x in refs]
        cand_len += len(c)
        ref_len += min((abs(len(x) - len(c)), len(x)) for x in r)[1]
        for n in range(1, 5):
            counts = ngrams(c, n)
            best = Counter()
            for x in r:
                best |= ngrams(x, n)
            matched[n - 1] += sum(min(k, best[g]) for g, k in counts.items())
            total[n - 1] += sum(counts.values())
    if min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total)) / 4
    brevity = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / max(cand_len, 1))
    return brevity * math.exp(log_precision)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(
    candidates: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2
) -> float:
    """Mean over candidates of the best ROUGE-L F-measure against their references, in [0, 1]."""
    _check(candidates, references)
    scores = []
    for cand, refs in zip(candidates, references):
        c = tokenize(cand)
        best = 0.0
        for ref in refs:
            r = tokenize(ref)
            lcs = lcs_length(c, r)
            if lcs:
                precision, recall = lcs / len(c), lcs / len(r)
                f = (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
                best = max(best, f)
        scores.append(best)
    return sum(scores) / len(scores) if scores else 0.0


def _tfidf(counts: Counter, df: Counter, num_docs: int) -> tuple[dict, float]:
    vector = {g: k * (math.log(num_docs) - math.log(max(1.0, df[g]))) for g, k in counts.items()}
    return vector, math.sqrt(sum(v * v for v in vector.values()))


def cider_d(
    candidates: Sequence[str], references: Sequence[Sequence[str]], sigma: float = 6.0
) -> float:
    """Corpus-mean CIDEr-D (0 for unrelated captions, about 10 for a perfect one on a varied
    corpus; IDF needs several items to mean anything)."""
    _check(candidates, references)
    refs_tokens = [[tokenize(r) for r in refs] for refs in references]
    num_docs = len(candidates)
    scores = [0.0] * num_docs
    for n in range(1, 5):
        df = Counter()
        for refs in refs_tokens:
            df.update(set().union(*(ngrams(r, n).keys() for r in refs)))
        for i, cand in enumerate(candidates):
            c = tokenize(cand)
            c_vec, c_norm = _tfidf(ngrams(c, n), df, num_docs)
            total = 0.0
            for r in refs_tokens[i]:
                r_vec, r_norm = _tfidf(ngrams(r, n), df, num_docs)
                dot = sum(min(v, r_vec[g]) * r_vec[g] for g, v in c_vec.items() if g in r_vec)
                if c_norm and r_norm:
                    penalty = math.exp(-((len(c) - len(r)) ** 2) / (2 * sigma**2))
                    total += penalty * dot / (c_norm * r_norm)
            scores[i] += total / len(refs_tokens[i]) / 4
    return 10.0 * sum(scores) / num_docs if num_docs else 0.0


def caption_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    return {
        "bleu4": bleu4(candidates, references),
        "rouge_l": rouge_l(candidates, references),
        "cider_d": cider_d(candidates, references),
    }
