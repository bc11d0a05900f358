"""The real task's data: parsing the ICWSM-2014 snippet file, the split, the openings, the preference pairs, the
VADER judge. A small inline sample in the real file format; no download."""

from __future__ import annotations

import json

import pytest

from services.pipeline import reviews
from services.training.reward import read_groups
from shared.training import split

# The real file's format: id<TAB>mean rating<TAB>text, CRLF line ends, UTF-8, '' for a double quote, runs of spaces
# where a dash was.
SAMPLE = (
    "1\t2.266666667\tThe Rock is destined to be the 21st Century's new ''Conan'' and that he's going to make a "
    "splash.\r\n"
    "2\t-2.65\t...no charm, no laughs, no fun, no reason to watch.\r\n"
    "3\t1.8\tMünch's genuine insight makes the film's occasional overindulgence forgivable.\r\n"
    "\r\n"
    "4\t-1.5\tThe film is dull    things that seem so real in small doses    become annoying.\r\n"
)


def snippets(count: int = 60) -> list[reviews.Snippet]:
    """``count`` snippets of 12 words over a few first words, with ratings spread over -4..+4."""
    firsts = ["The", "A", "It's", "This", "An"]
    return [
        reviews.Snippet(
            str(i),
            round(-4 + 8 * ((i * 37) % 100) / 99, 3),
            f"{firsts[i % 5]} film number {i} is " + " ".join(["good"] * (i % 3) + ["quite", "long", "indeed", "ok"]),
        )
        for i in range(count)
    ]


def test_parse_reads_the_file_format_crlf_and_utf8(tmp_path):
    path = tmp_path / "movieReviewSnippets_GroundTruth.txt"
    path.write_bytes(SAMPLE.encode("utf-8"))
    parsed = reviews.read_snippets(path)
    assert [s.id for s in parsed] == ["1", "2", "3", "4"]
    assert [s.rating for s in parsed] == [2.266666667, -2.65, 1.8, -1.5]
    assert parsed[0].text.startswith('The Rock is destined to be the 21st Century\'s new "Conan" and')
    assert parsed[2].text.startswith("Münch's genuine insight")
    assert parsed[3].text == "The film is dull things that seem so real in small doses become annoying."
    assert not any("\r" in s.text or "\n" in s.text for s in parsed)


def test_parse_names_the_bad_line():
    with pytest.raises(ValueError, match="line 2"):
        reviews.parse_snippets("1\t0.5\tfine\r\n2\tno rating here\r\n")


def test_split_is_deterministic_disjoint_and_sized():
    data = snippets(200)
    first = reviews.split_snippets(data, ppo=40, evaluation=20, seed=3)
    assert first == reviews.split_snippets(data, ppo=40, evaluation=20, seed=3)
    assert first != reviews.split_snippets(data, ppo=40, evaluation=20, seed=4)
    parts = [{s.id for s in part} for part in (first.reward_model, first.ppo, first.evaluation)]
    assert [len(p) for p in parts] == [140, 40, 20]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set().union(*parts) == {s.id for s in data}


def test_split_refuses_more_prompts_than_snippets():
    with pytest.raises(ValueError, match="exceeds"):
        reviews.split_snippets(snippets(20), ppo=15, evaluation=10, seed=0)


def test_openings_are_prefixes_of_four_to_six_words():
    data = snippets(100)
    texts = reviews.openings(data, seed=0)
    assert texts == reviews.openings(data, seed=0)
    assert texts != reviews.openings(data, seed=1)
    for snippet, text in zip(data, texts, strict=True):
        assert snippet.text.startswith(text)
        assert 4 <= len(text.split(" ")) <= 6
        assert len(snippet.text.split(" ")) - len(text.split(" ")) >= reviews.MIN_CONTINUATION_WORDS
    assert {len(t.split(" ")) for t in texts} == {4, 5, 6}


def test_pairs_share_an_opening_respect_the_margin_and_prefer_the_higher_rating():
    data = snippets(120)
    by_text = {s.text: s for s in data}
    rows = reviews.preference_pairs(data, margin=1.5, max_pairs=1000, seed=0)
    assert rows and rows == reviews.preference_pairs(data, margin=1.5, max_pairs=1000, seed=0)
    uses: dict[str, int] = {}
    for row in rows:
        chosen, rejected = by_text[row["prompt"] + row["chosen"]], by_text[row["prompt"] + row["rejected"]]
        assert row["prompt"] == chosen.text.split(" ")[0] == rejected.text.split(" ")[0]
        assert chosen.rating - rejected.rating >= 1.5
        assert (row["chosen_rating"], row["rejected_rating"]) == (chosen.rating, rejected.rating)
        for snippet in (chosen, rejected):
            uses[snippet.id] = uses.get(snippet.id, 0) + 1
    assert max(uses.values()) <= 2
    assert len(reviews.preference_pairs(data, margin=1.5, max_pairs=7, seed=0)) == 7


def test_pairs_read_by_the_reward_job_hold_out_whole_snippets(tmp_path):
    """The reward job groups rows by prompt and holds out whole groups; every snippet has one opening, so the
    held-out pairs share no snippet with the training pairs."""
    rows = reviews.preference_pairs(snippets(200), margin=1.0, max_pairs=1000, seed=0)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, held_out = split(read_groups(path), 0.2, 0)
    assert held_out

    def texts(groups):
        return {g.prompt + r for g in groups for r in g.responses}

    assert not texts(train) & texts(held_out)
    assert sum(len(g.pairs) for g in train + held_out) == len(rows)


def test_gold_reward_is_vader_on_the_whole_sentence():
    assert reviews.gold_reward("The film is", " a wonderful, moving delight.") > 0.5
    assert reviews.gold_reward("The film is", " a dull, awful mess.") < -0.5
    assert reviews.gold_reward("The film is", " ninety minutes long.") == 0.0
    assert reviews.gold_rewards(["a", "b"], [" great", " bad"]) == [
        reviews.vader_compound("a great"),
        reviews.vader_compound("b bad"),
    ]
