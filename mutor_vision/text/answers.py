"""Final answers pulled out of generated text and scored.

GSM8K: numbers compared as numbers ("18.0" == "18", "1,000" == "1000", "3/4" == "0.75"), the
lenient score; the authors' string comparison is kept beside it (``authors_match``) because it is
the score the paper reports and it under-counts correct answers. MATH500: the last ``\\boxed{}``
answer, normalised (spaces, ``\\left``/``\\right``, ``\\dfrac``, units) before comparison.
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


# ---------------------------------------------------------------- GSM8K, the authors' protocol

_AUTHORS_ANSWER = re.compile(r"#### (-?[0-9.,]+)")


def authors_answer(text: str) -> str | None:
    """The MuToR authors' GSM8K answer: the first ``#### <number>``, commas removed; None without one."""
    match = _AUTHORS_ANSWER.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def authors_match(prediction: str, reference: str) -> bool:
    """The authors' scoring: the two answers equal as strings ("18.0" != "18"); no fallback."""
    predicted, expected = authors_answer(prediction), authors_answer(reference)
    return predicted is not None and predicted == expected


# ---------------------------------------------------------------- MATH: the boxed answer, normalised


def boxed_answer(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed x``) in ``text``."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    tail = text[start:]
    after = tail.removeprefix("\\boxed") if tail.startswith("\\boxed") else tail.removeprefix("\\fbox")
    if after.startswith(" "):  # "\boxed 5"
        return after[1:].split("$")[0].strip() or None
    if not after.startswith("{"):
        return None
    depth = 0
    for index, char in enumerate(after):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return after[1:index]
    return None  # unbalanced braces


def normalise_math(answer: str) -> str:
    """A MATH answer in a canonical string form, so equivalent spellings compare equal.

    The usual rules of MATH evaluation: no spaces, line breaks, ``\\left``/``\\right``, ``\\!``, dollar
    signs, degree marks or percent signs; ``tfrac``/``dfrac`` as ``frac``; trailing ``\\text{...}``
    units dropped; ``x = 5`` as ``5``; a leading ``.5`` as ``0.5`` and ``0.5`` as ``\\frac{1}{2}``;
    ``\\sqrt3`` as ``\\sqrt{3}``, ``\\frac12`` as ``\\frac{1}{2}``, ``3/4`` as ``\\frac{3}{4}``.
    """
    s = answer.replace("\n", "").replace("\\!", "")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "").replace("%", "")
    if "\\text{ " in s:  # units: "5 \text{ cm}"
        s = s.split("\\text{ ")[0]
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    parts = s.split("=")
    if len(parts) == 2 and len(parts[0].strip()) <= 2:  # "x = 5", "k=3"
        s = parts[1]
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = s.replace(" ", "")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]+)\}(\d)", r"\\frac{\1}{\2}", s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    if re.fullmatch(r"-?\d+/\d+", s):
        numerator, denominator = s.split("/")
        s = f"\\frac{{{numerator}}}{{{denominator}}}"
    return s


def math_match(prediction: str, reference: str) -> bool:
    """The last boxed answer of ``prediction`` equals ``reference`` (a bare answer) once both are normalised."""
    predicted = boxed_answer(prediction)
    return predicted is not None and normalise_math(predicted) == normalise_math(reference)
