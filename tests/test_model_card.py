"""The model card: front matter round-trips every concept through ModelCard.load, hostile names cannot break or
inject into the YAML or the Markdown, the request table and evaluation figures."""

from __future__ import annotations

import html
import random
import re

import pytest
from conftest import FAST
from huggingface_hub import ModelCard

import diffusers_unlearn as du
from diffusers_unlearn.engine.ledger import Ledger, RequestRecord
from diffusers_unlearn.publishing.model_card import TAGS, build_model_card, card_yaml, escape_markdown

HOSTILE = [
    "van gogh",
    'say "hi"',
    "it's",
    "a\nb",
    "---",
    "a\n---\nb",
    "---\nbase_model: evil/model\n---\n# owned",
    "x | y || z",
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "`code` ```fence```",
    "# heading",
    "key: value",
    "- item",
    "&amp; &#124;",
    "line\u2028separator\u2029paragraph",
    "a\r\nb\rc",
    "...",
    "\x85next line",
    "null",
    "yes",
    "1e3",
    "[link](javascript:alert(1))",
    "![image](http://example.com/x.png)",
    "{a: b, c: [d]}",
    "*bold* _it_ ~~strike~~",
    "$$x^2$$",
    "tab\there",
    "üñí 日本 😀",
    "back\\slash\\",
    "nul\x00byte",
    "\ufeffbom",
    "\u202eright-to-left",
    "trailing ---",
    "x" * 300,
]


def record(i: int, concept: str, evaluation: dict | None = None, regularizers: list | None = None) -> RequestRecord:
    return RequestRecord(
        request_id=f"r{i:04d}", index=i, concept=concept, domain="style", method="esd",
        method_config={"method": "esd"}, strategy={"strategy": "sequential"}, regularizers=regularizers or [],
        adapter={"kind": "lora"}, training={}, prompts=[], steps=10 + i, seed=0, seconds=1.0, final_loss=0.1,
        base_fingerprint="kv-test", library_version=du.__version__, created_at="2025-03-04T05:06:07+00:00",
        evaluation=evaluation or {},
    )


def ledger_of(concepts: list[str], **kwargs) -> Ledger:
    return Ledger("kv-test", [record(i, c, **kwargs) for i, c in enumerate(concepts, start=1)], len(concepts) + 1)


def unescape(cell: str) -> str:
    return html.unescape(re.sub(r"\\(.)", r"\1", cell))


def single_line(text: str) -> str:
    text = re.sub(r"[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]+", " ", text)
    import unicodedata

    return "".join(" " if unicodedata.category(ch)[0] == "C" else ch for ch in text).strip()


def test_hostile_concepts_round_trip_through_modelcard_load(tmp_path):
    card = build_model_card(ledger_of(HOSTILE), base_model="someone/base", pipeline_class="StableDiffusionPipeline")
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.removed_concepts == HOSTILE
    assert [r["concept"] for r in loaded.data.unlearning["requests"]] == HOSTILE
    assert loaded.data.base_model == "someone/base"  # not "evil/model"
    assert loaded.data.library_name == "diffusers"
    assert set(TAGS) <= set(loaded.data.tags) and loaded.data.pipeline_tag == "text-to-image"
    assert set(loaded.data.to_dict()) == {"base_model", "library_name", "pipeline_tag", "tags", "removed_concepts",
                                          "unlearning"}
    assert loaded.text == card.text  # the body is where the YAML block said it ends
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == card.content


def test_hostile_concepts_cannot_break_the_markdown_body():
    card = build_model_card(ledger_of(HOSTILE), base_model="someone/base")
    body = card.text
    for bad in ("<script", "<img", "\r", "\x85", "\u2028", "\u2029", "\x00", "\u202e", "$$"):
        assert bad not in body, bad
    assert not any(line.startswith("---") for line in body.splitlines())
    table = [line for line in body.splitlines() if re.match(r"\| \d+ \| r\d{4} \|", line)]
    assert len(table) == len(HOSTILE)
    assert not any(re.search(r"(?<!\\)\]\(", line) for line in table)  # no link or image: "[", "]" escaped
    for line, concept in zip(table, HOSTILE):
        assert line.count("|") == 10, line  # 9 cells (the last: the erasure check): no pipe of the concept splits a cell
        cell = line.split("|")[3].strip()
        expected = single_line(concept)
        if len(expected) <= 200:
            assert unescape(cell) == expected  # escaping loses nothing but line breaks and control characters
        else:
            assert unescape(cell) == expected[:199] + "\u2026"
    assert "| 1 | r0001 | van gogh | style | esd | none | 2025-03-04 | 11 |" in body


def test_random_strings_round_trip_through_the_front_matter():
    rng = random.Random(0)
    pool = list("ab -|:#'\"\\`<>&*_[]{}()!$~\n\r\t.,?%@") + ["\x85", "\u2028", "\u2029", "\x00", "\x1b", "é", "日",
                                                          "😀", "---", "...", "\ufeff", "\u202e"]
    concepts = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 12))) for _ in range(300)]
    card = build_model_card(ledger_of(concepts))
    assert ModelCard(card.content).data.removed_concepts == concepts
    for text in concepts:
        assert ModelCard(f"---\n{card_yaml({'x': text})}---\nbody").data.x == text


def test_table_columns_regularizers_and_evaluation_figures():
    regs = [
        {"name": "gradient_projection", "keep": ["monet"], "neighbors": 8, "threshold": None, "vocabulary": None,
         "keep_earlier": True, "dedup_cosine": 0.95, "warn_in_span": 0.9, "report": {"protected": []}},
        {"name": "l2_drift", "weight": 1000.0, "reference": "previous", "report": {}},
    ]
    ledger = ledger_of(["van gogh", "dog"], regularizers=regs, evaluation={"UA": 91.5, "IRA": {"style": 80.25}})
    card = build_model_card(ledger, evaluation={"CRA": 77.0})
    body = card.text
    assert "| concept | domain | method | regularizers | date | steps |" in body
    assert "gradient\\_projection(keep=\\[monet\\]); l2\\_drift(weight=1000)" in body  # defaults left out
    assert "## Evaluation" in body
    assert "| r0001 (van gogh) | UA | 91.5 |" in body
    assert "| r0002 (dog) | IRA.style | 80.25 |" in body
    assert "| all requests | CRA | 77 |" in body
    assert "base_model" not in card.data.to_dict()  # unknown base: left out rather than invented
    assert "a local checkpoint" in body
    no_figures = build_model_card(ledger_of(["van gogh"]))
    assert "## Evaluation" not in no_figures.text


def test_escape_markdown_examples():
    assert escape_markdown("a|b") == "a&#124;b"
    assert escape_markdown("<b>&") == "&#60;b&#62;&#38;"
    assert escape_markdown("a\nb\r\nc") == "a b c"
    assert escape_markdown("*x*_y_") == "\\*x\\*\\_y\\_"
    assert escape_markdown("") == "&#32;"


def test_saved_card_keeps_a_trained_hostile_concept(tmp_path):
    hostile = 'van "gogh"\n---\nbase_model: evil/x | <b>bold</b>'
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    pipe.unlearn(hostile, domain="style", seed=0, **dict(FAST, steps=2))
    pipe.save_unlearned(tmp_path / "saved", evaluation={"UA": 100.0})
    loaded = ModelCard.load(tmp_path / "saved" / "README.md")
    assert loaded.data.removed_concepts == [hostile]
    assert loaded.data.get("base_model") is None
    assert "| all requests | UA | 100 |" in loaded.text
    assert pipe.unlearned_model_card().data.removed_concepts == [hostile]


@pytest.mark.parametrize("bad, error", [(3, TypeError), (["a/b"], TypeError), ("x](javascript:1)", ValueError),
                                        ("a/b/c", ValueError), ("../etc", ValueError), ("a b", ValueError)])
def test_base_model_must_be_a_hub_id(tmp_path, bad, error):
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    with pytest.raises(error, match="base_model must be a Hub model id"):
        pipe.save_unlearned(tmp_path / "x", base_model=bad)
    assert not (tmp_path / "x").exists()
    with pytest.raises(error, match="base_model must be a Hub model id"):
        build_model_card(ledger_of(["cat"]), base_model=bad)


def test_a_solved_request_reads_as_solved_not_trained():
    import dataclasses

    solved = dataclasses.replace(record(1, "van gogh", regularizers=[
        {"name": "closed_form", "report": {"protected": ["monet", "picasso", "cat"], "solve_rank": 5}}]),
        method="closed_form", method_config={"method": "closed_form"}, steps=0)
    card = str(build_model_card(Ledger("kv-test", [solved], 2)))
    assert "| none (solved in closed form, keeping 3 concepts) |" in card
    assert "each request was solved on top of the earlier ones" in card and "was trained" not in card
    trained = build_model_card(Ledger("kv-test", [solved, record(2, "monet")], 3))
    assert "each request was trained or solved on top" in str(trained)
