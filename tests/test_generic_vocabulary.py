"""The generic protection set: its size, its determinism, no phrase twice, every word a checked concept, and
prefixes that mix every rule and every word."""

from __future__ import annotations

import pytest

from diffusers_unlearn import generic_vocabulary as gv
from diffusers_unlearn.objectives import ClosedFormConfig
from diffusers_unlearn.prompts import TEMPLATES, check_concept
from diffusers_unlearn.regularizers import GradientProjection


def test_the_grammar_gives_thousands_of_concepts_and_prompts_of_exact_sizes():
    vocabulary, lists = gv.generic_vocabulary(), gv.WORD_LISTS
    colours, textures, media = len(lists["colour"]), len(lists["texture"]), len(lists["medium"])
    subjects, styles = len(lists["subject"]), len(lists["art style"])
    # the grammar's rules, counted from the lists: every word of a rule once, every pair once
    assert len(vocabulary["style"]) == styles + media + colours + textures + colours * (textures + media)
    assert len(vocabulary["object"]) == subjects + colours * subjects
    assert len(gv.generic_prompts()) == 3 * gv.PROMPT_ROUNDS * subjects
    assert min(len(vocabulary["style"]), len(vocabulary["object"]), len(gv.generic_prompts())) > 2000


def test_the_set_is_the_same_on_every_call_and_a_limit_is_a_prefix():
    first, again = gv.generic_vocabulary(), gv.generic_vocabulary()
    assert first == again and first is not again  # a new dict each time: a caller's edit cannot leak
    limited = gv.generic_vocabulary(100)
    assert {d: len(cs) for d, cs in limited.items()} == {"style": 100, "object": 100}
    assert all(first[d][:100] == limited[d] for d in first)
    assert gv.generic_prompts(7) == gv.generic_prompts()[:7]
    assert gv.generic_vocabulary(0) == {"style": (), "object": ()}


@pytest.mark.parametrize("limit", [-1, 2.5, "10", True])
def test_a_bad_limit_is_refused_with_its_name(limit):
    with pytest.raises(ValueError, match="limit must be an integer >= 0"):
        gv.generic_vocabulary(limit)
    with pytest.raises(ValueError, match="limit must be an integer >= 0"):
        gv.generic_prompts(limit)


def test_no_phrase_appears_twice():
    vocabulary, prompts = gv.generic_vocabulary(), gv.generic_prompts()
    everything = [*vocabulary["style"], *vocabulary["object"], *prompts]
    assert len({" ".join(p.lower().split()) for p in everything}) == len(everything)
    words = [w for ws in gv.WORD_LISTS.values() for w in ws]
    assert len(set(words)) == len(words)  # no word in two lists: a word has one role in the grammar
    assert len(gv.phrases()) == len(set(gv.phrases()))


def test_every_word_and_phrase_is_a_checked_lower_case_concept_that_fills_a_template():
    for kind, words in gv.WORD_LISTS.items():
        for word in words:
            assert check_concept(word, kind) == word == word.lower()
            assert all(part.isalpha() or part.isdigit() or part == "3d" for part in word.split()), word
    for domain, concepts in gv.generic_vocabulary().items():
        for concept in concepts:
            assert check_concept(concept) == concept
            assert all(" ".join(t.format(concept).split()) == t.format(concept) for t in TEMPLATES[domain])
    # the methods take the set as it is
    ClosedFormConfig(vocabulary=gv.generic_vocabulary(50))
    GradientProjection(vocabulary=gv.generic_vocabulary(50), neighbors=4)


def test_a_short_prefix_mixes_every_rule_and_every_colour():
    lists = gv.WORD_LISTS
    style = gv.generic_vocabulary(6 * len(lists["colour"]))["style"]
    singles = set(style)
    assert singles & set(lists["art style"]) and singles & set(lists["medium"])
    assert singles & set(lists["colour"]) and singles & set(lists["texture"])
    pairs = [c for c in style if c not in set(lists["art style"]) | set(lists["medium"]) | set(lists["colour"])
             | set(lists["texture"])]
    # the colour x texture and colour x medium rules run in rounds that use every colour
    first_colours = {c for c in lists["colour"] if any(p.startswith(c + " ") for p in pairs)}
    assert first_colours == set(lists["colour"])
    prompts = gv.generic_prompts(3 * len(lists["subject"]))
    assert {p.split(" in ")[0].split(" ", 1)[1] for p in prompts if p.endswith(" style")} == set(lists["subject"])
