"""GSM8K-style numeric answers, compared as numbers ("18.0" == "18", "1,000" == "1000", "3/4" == "0.75").

The official MuToR code compared strings; that under-counts correct answers.
"""

from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d[\d,]*)?|-?\$?\.\d+")


def parse_number(text: str) -> Fraction | None:
    """A number from text like "1,000", "-3.50", "$18", "3/4"; None if there is none."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if not cleaned:
        return None
    try:
        if "/" in cleaned:
            numerator, denominator = cleaned.split("/", 1)
            return Fraction(Fraction(numerator), Fraction(denominator))
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(text: str) -> Fraction | None:
    """The final answer: the number after the last "####" if present, else the last number in the text."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    matches = _NUMBER.findall(tail)
    if not matches:
        return None
    return parse_number(matches[0] if "####" in text else matches[-1])


def answers_match(prediction: str, reference: str) -> bool:
    """Numeric equality of the extracted answers (False when either has no number)."""
    predicted, expected = extract_answer(prediction), extract_answer(reference)
    return predicted is not None and expected is not None and predicted == expected
