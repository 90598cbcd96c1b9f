"""escalation.py: a request whose erasure check fails is served again with stronger method settings; every entry is
checked before anything is solved (the served ladders themselves are in test_classifier_check.py)."""

from __future__ import annotations

import dataclasses

import pytest
from test_erasure_check import ROOM, pipe  # noqa: F401  (the same quiet tiny pipeline and closed-form request)

import diffusers_unlearn as du
from diffusers_unlearn.engine.escalation import (
    check_erasure_check,
    effective_escalation,
    escalated_requests,
    escalation_options,
)

LADDER = [{"negative_guidance": 2.0}, {"negative_guidance": 3.0, "keep_weight": 5.0}]


def test_each_attempt_is_the_request_with_its_entry_over_the_method_settings_and_nothing_else():
    request = du.UnlearnRequest.build("van gogh", domain="style", seed=3)
    attempts = escalated_requests(request, LADDER)
    assert attempts[0] is request and len(attempts) == 3
    for attempt, entry in zip(attempts[1:], LADDER):
        assert all(getattr(attempt, f.name) == getattr(request, f.name)  # only the method settings differ
                   for f in dataclasses.fields(request) if f.name != "method")
        changed = {f.name for f in dataclasses.fields(request.method)
                   if getattr(attempt.method, f.name) != getattr(request.method, f.name)}
        assert changed == set(entry) and all(getattr(attempt.method, k) == v for k, v in entry.items())
    assert [escalation_options(LADDER, i) for i in range(3)] == [{}, *LADDER]
    assert escalated_requests(request, None) == [request]
    explicit = du.UnlearnRequest.build("van gogh", domain="style", prompts=["van gogh sunflowers"])
    assert escalated_requests(explicit, LADDER)[2].prompts == ["van gogh sunflowers"]


def test_a_ladder_step_that_serves_the_request_as_it_is_is_dropped():
    request = du.UnlearnRequest.build("cat", domain="style")
    own = request.method.negative_guidance
    ladder = [{"negative_guidance": own}, {"negative_guidance": own + 1.0}]
    assert effective_escalation(request, ladder) == [ladder[1]]
    assert effective_escalation(request, None) is None


def test_a_check_is_anything_with_measure_and_verdict():
    assert isinstance(check_erasure_check(None), du.ErasureCheck)
    custom = du.ClassifierCheck(lambda images: ["dog"] * len(images), ["a {} image"])
    assert check_erasure_check(custom) is custom
    with pytest.raises(TypeError, match="an object with measure"):
        check_erasure_check(object())


@pytest.mark.parametrize("options, error, match", [
    (dict(escalate=[{"guidance": 2.0}]), ValueError, r"escalate entry 0 names \['guidance'\], which are not "
                                                     r"closed_form settings; allowed: \[.*'negative_guidance'"),
    (dict(escalate={"negative_guidance": 2.0}), TypeError, "escalate must be a list"),
    (dict(escalate=[{}]), TypeError, "escalate entry 0 must be a non-empty mapping"),
    (dict(escalate=[{"negative_guidance": -1.0}]), ValueError, "negative_guidance"),
    (dict(erasure_check="classifier"), TypeError, "erasure_check must be an ErasureCheck, a ClassifierCheck"),
])
def test_bad_escalation_or_check_is_refused_before_anything_is_solved(pipe, options, error, match):  # noqa: F811
    with pytest.raises(error, match=match):
        pipe.unlearn("van gogh", **options, **ROOM)
    assert pipe.unlearning_ledger.ids() == []
