"""The demo task: convert a date written in words to ISO 8601 (YYYY-MM-DD).

Verifiable by code, with enough headroom: SmolLM2-135M-Instruct gets it exactly right only part of
the time (it often adds words or mixes up day and month), and a small LoRA makes it reliable.
Train and test dates are disjoint, so the "after" accuracy is measured on held-out items.
"""

from __future__ import annotations

import datetime as dt
import random

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
INSTRUCTION = "Convert this date to ISO 8601 format (YYYY-MM-DD). Answer with the date only."


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def spell_date(date: dt.date, style: int) -> str:
    """`date` written out in input style number `style` ('March 5, 2021', '5 March 2021', ...)."""
    month, short = MONTHS[date.month - 1], MONTHS[date.month - 1][:3]
    styles = [
        f"{month} {date.day}, {date.year}",
        f"{date.day} {month} {date.year}",
        f"{short} {date.day}, {date.year}",
        f"the {_ordinal(date.day)} of {month}, {date.year}",
        f"{month} {_ordinal(date.day)}, {date.year}",
        f"{date.day} {short}. {date.year}",
    ]
    return styles[style % len(styles)]


def make_split(n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Alpaca records for disjoint train and test dates between 1900 and 2099."""
    rng = random.Random(seed)
    start, span = dt.date(1900, 1, 1), (dt.date(2099, 12, 31) - dt.date(1900, 1, 1)).days
    days = rng.sample(range(span), n_train + n_test)
    records = []
    for offset in days:
        date = start + dt.timedelta(days=offset)
        records.append({"instruction": INSTRUCTION, "input": spell_date(date, rng.randrange(6)),
                        "output": date.isoformat()})
    return records[:n_train], records[n_train:]


def score(response: str, expected: str) -> tuple[bool, bool]:
    """(exact: the response is the ISO date and nothing else, contains: the right date appears in it)."""
    return response.strip() == expected, expected in response
