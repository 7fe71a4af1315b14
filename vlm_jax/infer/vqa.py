"""VQA answer normalisation and exact-match accuracy, after the VQAv2 evaluation script.

The official metric averages min(#annotators agreeing / 3, 1) over ten human answers; our records carry one
reference answer, so accuracy is exact match after the same normalisation: lower case, punctuation removed
(a period between digits kept), number words to digits, articles dropped, common contractions restored.
"""
from __future__ import annotations

import re

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "im": "i'm", "ive": "i've", "youre": "you're", "whats": "what's",
                 "thats": "that's", "theres": "there's", "wasnt": "wasn't", "didnt": "didn't"}
_PUNCTUATION = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:]")
_PERIOD_NOT_DECIMAL = re.compile(r"(?<!\d)\.(?!\d)")


def normalize_answer(answer: str) -> str:
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _PERIOD_NOT_DECIMAL.sub("", _PUNCTUATION.sub("", text.replace("'", "")))
    words = [_CONTRACTIONS.get(w, _NUMBERS.get(w, w)) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def majority_baseline(references: list[str]) -> float:
    """Accuracy of always giving the held-out set's own most frequent answer. Every question of a task has
    the same wording, so no model that cannot see the image does better: an upper bound on text-only."""
    if not references:
        return 0.0
    counts: dict[str, int] = {}
    for a in map(normalize_answer, references):
        counts[a] = counts.get(a, 0) + 1
    return max(counts.values()) / len(references)
