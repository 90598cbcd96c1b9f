# The code of the "Requests and the ledger" page, on the tiny offline pipeline. Run by tests/test_docs.py.
import diffusers_unlearn as du

pipe = du.attach(du.testing.tiny_pipeline(seed=0))

# --8<-- [start:request]
request = du.UnlearnRequest.build("monet", domain="style", keep=["picasso"])   # checked in full, before any model loads
record = pipe.unlearn(request)           # the same request, described once (plans and the CLI build these too)
# --8<-- [end:request]
assert pipe.removed_concepts == ["monet"] and record.method == "closed_form"

answers = iter([["van gogh", "van gogh"], ["monet", "cat"]])


def classifier(images):  # stands in for your classifier: it still sees van gogh after the first attempt only
    return next(answers)


# --8<-- [start:check]
check = du.ClassifierCheck(classifier, templates=["a bear in {} style", "a cat in {} style"], seeds=[1])
pipe.unlearn("van gogh", domain="style", erasure_check=check,
             escalate=[{"negative_guidance": 2.0}, {"negative_guidance": 3.0}])
# --8<-- [end:check]
record = pipe.unlearning_ledger.requests[-1]
assert record.erasure["erased"] and len(record.erasure["attempts"]) == 1   # served again once, with guidance 2
assert record.method_config["negative_guidance"] == 2.0
