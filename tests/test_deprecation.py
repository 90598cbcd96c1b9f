"""_deprecation.py: one vocabulary for what a request keeps (``keep``, ``keep_weight``, ``keep_earlier``) across the
closed form, the trained methods' retain loss and gradient projection. The old names (``preserve``,
``preserve_weight``, ``include_earlier``, ``retain``, ``include_removed``) keep working for one release with a
FutureWarning naming the new one; both at once are refused; a ledger saved under the old names loads silently and
its signature equals that of the same request made with the new names."""

from __future__ import annotations

import json
import warnings

import pytest

import diffusers_unlearn as du
from diffusers_unlearn.objectives import ClosedFormConfig, build_objective_config
from diffusers_unlearn.regularizers import regularizer_from_dict
from diffusers_unlearn.engine.request import UnlearnRequest, record_signature

# (class, old name, new name, a value): every renamed option
RENAMED = [
    (ClosedFormConfig, "preserve", "keep", ["monet"]),
    (ClosedFormConfig, "preserve_weight", "keep_weight", 2.0),
    (ClosedFormConfig, "include_earlier", "keep_earlier", False),
    (du.ESDConfig, "preserve", "keep", ("monet",)),
    (du.ESDConfig, "preserve_weight", "keep_weight", 2.0),
    (du.GradientProjection, "retain", "keep", ["monet"]),
    (du.GradientProjection, "include_removed", "keep_earlier", False),
]
IDS = [f"{cls.__name__}.{old}" for cls, old, _, _ in RENAMED]


def _build(cls, options):
    """The object through the path a user's name or plan takes: the method registry, or the regularizer one."""
    if cls is du.GradientProjection:
        return regularizer_from_dict({"name": cls.name, **options})
    return build_objective_config(cls.method, options)


@pytest.mark.parametrize("cls, old, new, value", RENAMED, ids=IDS)
def test_an_old_name_warns_naming_the_new_one_and_sets_it(cls, old, new, value):
    expected = cls(**{new: value})
    assert getattr(expected, new) != getattr(cls(), new)  # the value is not the default: the mapping is visible
    for make in (lambda: cls(**{old: value}), lambda: _build(cls, {old: value})):
        with pytest.warns(FutureWarning, match=rf"`{old}` is deprecated and will be removed in version .*; use "
                                               rf"`{new}` instead"):
            made = make()
        assert made == expected
        assert old not in made.to_dict() and made.to_dict() == expected.to_dict()
    with pytest.warns(FutureWarning, match=rf"`{old}` is deprecated"):
        assert getattr(expected, old) == getattr(expected, new)  # reading the old attribute reads the new one


def test_the_new_names_raise_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ClosedFormConfig(keep=["monet"], keep_weight=2.0, keep_earlier=False)
        du.ESDConfig(keep=["monet"], keep_weight=2.0)
        du.GradientProjection(keep=["monet"], keep_earlier=False)
        UnlearnRequest.build("van gogh", "closed_form", domain="style", keep_weight=2.0)


@pytest.mark.parametrize("cls, old, new, value", RENAMED, ids=IDS)
def test_an_old_name_beside_its_new_one_is_refused(cls, old, new, value):
    for make in (lambda options: cls(**options), lambda options: _build(cls, options)):
        with pytest.raises(TypeError, match=rf"got both '{old}' and '{new}'; '{old}' is the deprecated name of "
                                            rf"'{new}', pass '{new}' only"):
            make({old: value, new: value})


def test_a_request_option_under_an_old_name_reaches_the_method():
    with pytest.warns(FutureWarning, match="`preserve` is deprecated"):
        old = UnlearnRequest.build("van gogh", "closed_form", domain="style", preserve=["monet"], keep=["dali"])
    new = UnlearnRequest.build("van gogh", "closed_form", domain="style", keep=["monet", "dali"])
    assert old.method.keep == new.method.keep == ["monet", "dali"]
    assert old.signature() == new.signature()


def test_an_old_name_wins_over_the_recommended_setting_it_renames():
    # an object request with no method gets the recommended keep_weight 5; the user's own value wins under either name
    assert UnlearnRequest.build("cat", domain="object").method.keep_weight == 5.0
    with pytest.warns(FutureWarning, match="`preserve_weight` is deprecated"):
        old = UnlearnRequest.build("cat", domain="object", preserve_weight=1.0)
    assert old.method.keep_weight == 1.0
    assert old.signature() == UnlearnRequest.build("cat", domain="object", keep_weight=1.0).signature()


# (a new name in a saved record, its name in ledgers of earlier versions)
OLD_METHOD_NAMES = {"keep": "preserve", "keep_weight": "preserve_weight", "keep_earlier": "include_earlier"}
OLD_PROJECTION_NAMES = {"keep": "retain", "keep_earlier": "include_removed"}
VOCABULARY = ["monet", "dali", "klimt"]
TRAIN = dict(steps=2, sampling_steps=2, num_trajectories=1)


def test_a_ledger_saved_under_the_old_names_loads_silently_and_keeps_its_signature(tmp_path):
    solved = UnlearnRequest.build("van gogh", "closed_form", domain="style", keep=["monet"], keep_weight=1.0,
                                  keep_earlier=True, vocabulary=VOCABULARY, sampling_steps=2)
    trained = UnlearnRequest.build(
        "dog", du.ESDConfig(keep=["cat"], keep_weight=0.5, sampling_steps=2, num_trajectories=1), domain="object",
        steps=2, regularizers=[du.GradientProjection(keep=["tiger"], neighbors=0, keep_earlier=False)])
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    pipe.unlearn(solved, progress=False)
    pipe.unlearn(trained, progress=False)
    pipe.save_unlearning(tmp_path / "saved")
    path = tmp_path / "saved" / "ledger.json"
    data = json.loads(path.read_text())
    for record in data["requests"]:  # written as an earlier version did
        record["method_config"] = {OLD_METHOD_NAMES.get(k, k): v for k, v in record["method_config"].items()}
        record["regularizers"] = [{OLD_PROJECTION_NAMES.get(k, k): v for k, v in entry.items()}
                                  if entry["name"] == "gradient_projection" else entry
                                  for entry in record["regularizers"]]
    assert {"preserve", "preserve_weight", "include_earlier"} <= set(data["requests"][0]["method_config"])
    assert {"retain", "include_removed"} <= set(data["requests"][1]["regularizers"][0])
    path.write_text(json.dumps(data))

    fresh = du.attach(du.testing.tiny_pipeline(seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no FutureWarning (nor anything else) on load
        fresh.load_unlearning(tmp_path / "saved")
    loaded = fresh.unlearning_ledger.requests
    assert [record_signature(r) for r in loaded] == [solved.signature(), trained.signature()]
    assert loaded[0].method_config == pipe.unlearning_ledger.requests[0].method_config
    assert not {"preserve", "preserve_weight", "include_earlier"} & set(loaded[0].method_config)
    # saved again, the ledger is written under the new names
    fresh.save_unlearning(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "ledger.json").read_text())
    assert again["requests"][1]["regularizers"][0]["keep"] == ["tiger"]
    assert "retain" not in again["requests"][1]["regularizers"][0]


def test_a_stored_record_with_an_old_name_beside_its_new_one_is_refused(tmp_path):
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    pipe.unlearn("van gogh", "closed_form", domain="style", keep=["monet"], vocabulary=VOCABULARY, sampling_steps=2,
                 progress=False)
    pipe.save_unlearning(tmp_path)
    data = json.loads((tmp_path / "ledger.json").read_text())
    data["requests"][0]["method_config"]["preserve"] = ["dali"]
    (tmp_path / "ledger.json").write_text(json.dumps(data))
    fresh = du.attach(du.testing.tiny_pipeline(seed=0))
    with pytest.raises(du.LedgerError, match=r"requests\[0\].*got both 'preserve' and 'keep'"):
        fresh.load_unlearning(tmp_path)
    assert fresh.unlearning_ledger.ids() == []
