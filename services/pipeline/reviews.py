"""The real task: write positive movie-review sentences, learnt from people's ratings, judged by VADER.

Data: the ICWSM-2014 movie-review snippets (Hutto & Gilbert 2014): 10,605 sentences from reviews, each with the
mean of about 20 people's ratings on -4 (very negative) .. +4 (very positive).

- Prompts are review **openings**: the first 4-6 words of a snippet, plain text (no chat template), which SmolLM2
  continues.
- Preference pairs for the Bradley-Terry reward model are two snippets that **share their opening** (their first
  word, exactly): ``prompt`` = that shared opening, ``chosen`` / ``rejected`` = the rest of the higher / lower rated
  snippet, kept only when the mean ratings differ by at least a margin. The reward model reads ``prompt +
  response``, so it trains on whole human-written snippets, and each pair contrasts two continuations of the same
  opening, as PPO's samples do. Each snippet belongs to one opening, so the reward job's held-out split (by
  prompt) never shares a snippet with its training pairs.
- The gold reward is VADER's compound score (a rule-based sentiment lexicon, in [-1, 1]) of the opening plus the
  continuation. Nothing in training sees it: it only judges the evaluation.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from shared.pretrained import movie_snippets_file


@dataclass(frozen=True)
class Snippet:
    id: str
    rating: float  # mean of the raters' scores, -4 (very negative) .. +4 (very positive)
    text: str  # whitespace normalised to single spaces


@dataclass(frozen=True)
class Splits:
    """Disjoint parts of the snippets: pairs for the reward model, PPO prompts, evaluation prompts."""

    reward_model: list[Snippet]
    ppo: list[Snippet]
    evaluation: list[Snippet]


def parse_snippets(content: str) -> list[Snippet]:
    """Rows ``id<TAB>mean rating<TAB>text`` (CRLF or LF line ends). The corpus writes a double quote as two single
    quotes and a dash as runs of spaces; both are normalised."""
    snippets = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(f"line {number}: expected id<TAB>rating<TAB>text, got {len(fields)} fields")
        identifier, rating, text = fields
        text = " ".join(text.replace("''", '"').split())
        if text:
            snippets.append(Snippet(identifier.strip(), float(rating), text))
    return snippets


def read_snippets(path: Path | str) -> list[Snippet]:
    return parse_snippets(Path(path).read_text(encoding="utf-8"))


def movie_snippets(cache_dir: Path | None = None) -> list[Snippet]:
    """The 10,605 rated movie-review snippets (fetched and cached on first use, see ``shared.pretrained``)."""
    return read_snippets(movie_snippets_file(cache_dir))


def split_snippets(snippets: list[Snippet], ppo: int, evaluation: int, seed: int) -> Splits:
    """A seeded shuffle into ``evaluation`` evaluation snippets, ``ppo`` PPO snippets and the rest for the reward
    model. Only snippets long enough to give an opening and a continuation go to the prompt parts."""
    order = list(snippets)
    random.Random(seed).shuffle(order)
    promptable = [s for s in order if len(s.text.split(" ")) >= MIN_PROMPT_SOURCE_WORDS]
    if ppo + evaluation > len(promptable):
        raise ValueError(f"ppo={ppo} + evaluation={evaluation} exceeds the {len(promptable)} usable snippets")
    evaluation_part = promptable[:evaluation]
    ppo_part = promptable[evaluation : evaluation + ppo]
    taken = {s.id for s in evaluation_part} | {s.id for s in ppo_part}
    return Splits([s for s in order if s.id not in taken], ppo_part, evaluation_part)


OPENING_WORDS = (4, 6)  # an opening is this many words (inclusive range), chosen per snippet
MIN_CONTINUATION_WORDS = 4
MIN_PROMPT_SOURCE_WORDS = OPENING_WORDS[1] + MIN_CONTINUATION_WORDS


def opening(snippet: Snippet, seed: int = 0) -> str:
    """The first 4-6 words of ``snippet`` (the count is a hash of its id and ``seed``): a prefix of its text."""
    low, high = OPENING_WORDS
    digest = hashlib.sha256(f"{seed}:{snippet.id}".encode()).digest()
    words = snippet.text.split(" ")
    count = min(low + digest[0] % (high - low + 1), max(1, len(words) - MIN_CONTINUATION_WORDS))
    return " ".join(words[:count])


def openings(snippets: list[Snippet], seed: int = 0) -> list[str]:
    return [opening(s, seed) for s in snippets]


def preference_pairs(
    snippets: list[Snippet], margin: float, max_pairs: int, seed: int, uses_per_snippet: int = 2
) -> list[dict]:
    """``{"prompt", "chosen", "rejected"}`` rows from snippets that share their first word.

    Within each first word's snippets, candidate pairs whose ratings differ by at least ``margin`` are taken in a
    seeded order while neither snippet has been used ``uses_per_snippet`` times (a snippet in two pairs is scored
    once per step: the reward job scores each response of a prompt once). Then ``max_pairs`` rows are kept,
    spread over the openings round-robin so that no opening dominates. ``prompt + chosen`` is the higher rated
    snippet exactly.
    """
    rng = random.Random(seed)
    by_opening: dict[str, list[Snippet]] = defaultdict(list)
    for snippet in snippets:
        first, space, rest = snippet.text.partition(" ")
        if space and rest:
            by_opening[first].append(snippet)
    per_opening: list[list[dict]] = []
    for first in sorted(by_opening):
        members = by_opening[first]
        candidates = [(a, b) for a, b in itertools.combinations(members, 2) if abs(a.rating - b.rating) >= margin]
        rng.shuffle(candidates)
        uses: dict[str, int] = defaultdict(int)
        rows = []
        for a, b in candidates:
            if uses[a.id] < uses_per_snippet and uses[b.id] < uses_per_snippet:
                uses[a.id] += 1
                uses[b.id] += 1
                high, low = (a, b) if a.rating > b.rating else (b, a)
                rows.append(
                    {
                        "prompt": first,
                        "chosen": high.text[len(first) :],
                        "rejected": low.text[len(first) :],
                        "chosen_rating": high.rating,
                        "rejected_rating": low.rating,
                    }
                )
        if rows:
            per_opening.append(rows)
    rng.shuffle(per_opening)
    kept: list[dict] = []
    for round_ in itertools.zip_longest(*per_opening):  # one row of each opening per round
        kept.extend(row for row in round_ if row is not None)
    return kept[:max_pairs]


@cache
def _vader():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ImportError("vadersentiment is not installed: pip install --no-deps -r requirements-real.txt") from None
    return SentimentIntensityAnalyzer()


def vader_compound(text: str) -> float:
    """VADER's compound sentiment score of ``text``, in [-1, 1] (Hutto & Gilbert 2014)."""
    return float(_vader().polarity_scores(text)["compound"])


def gold_reward(prompt: str, response: str) -> float:
    """The independent judge: VADER on the opening and its continuation, as the reader sees them."""
    return vader_compound(prompt + response)


def gold_rewards(prompts: list[str], responses: list[str]) -> list[float]:
    """The gold reward in the reward service's function form (``services.pipeline.reviews:gold_rewards``)."""
    return [gold_reward(p, r) for p, r in zip(prompts, responses, strict=True)]
