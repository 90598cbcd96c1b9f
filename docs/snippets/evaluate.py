# UA / IRA / CRA and an attack with your own classifier, on the tiny offline pipeline. Run by tests/test_docs.py.
import torch

import diffusers_unlearn as du
from diffusers_unlearn import evaluation as ev

STYLES, OBJECTS = ["van gogh", "monet", "picasso"], ["cat", "dog"]


# --8<-- [start:classifier]
class MyClassifier:
    """Any callable from a batch of images (tensors in [0, 1], or PIL images) to label names will do."""

    def __init__(self, labels):
        self.labels = list(labels)

    def __call__(self, images):
        x = images if isinstance(images, torch.Tensor) else torch.stack([ev.to_pil(i) for i in images])
        return [self.labels[int(im.mean(dim=(1, 2)).argmax()) % len(self.labels)] for im in x]
# --8<-- [end:classifier]


pipe = du.attach(du.testing.tiny_pipeline(seed=0))
pipe.set_progress_bar_config(disable=True)
record = pipe.unlearn("van gogh", domain="style", seed=0)

# --8<-- [start:scores]
config = ev.EvalConfig(styles=STYLES, objects=OBJECTS, template="a {object} in {style} style", seeds=[0, 1],
                       num_inference_steps=3, guidance_scale=3.0)
scores = ev.evaluate_unlearning(pipe, ["van gogh"], "style", MyClassifier(STYLES), MyClassifier(OBJECTS), config,
                                progress=False)
print(f"UA {scores.ua:.1f}  IRA {scores.ira:.1f}  CRA {scores.cra:.1f}")
# --8<-- [end:scores]

# --8<-- [start:attack]
result = ev.attack(pipe, "van gogh", "paraphrase", domain="style", classifier=MyClassifier(STYLES), seed=0,
                   templates=["{} artwork", "a drawing of {}"], seeds=1, num_inference_steps=3, progress=False)
print(f"plain {result.plain_accuracy:.1f}%  under attack {result.accuracy:.1f}%  robust UA {result.robust_ua:.1f}")
# --8<-- [end:attack]

# --8<-- [start:world]
world = ev.EvalWorld("my-world", STYLES, OBJECTS, "a {object} in {style} style",
                     heldout_templates=["{style} art of a {object}"], seeds=[0, 1], num_inference_steps=3,
                     guidance_scale=3.0, classifiers=lambda: (MyClassifier(STYLES), MyClassifier(OBJECTS)))
style_clf, object_clf = world.load_classifiers()
scores = ev.evaluate_unlearning(pipe, ["van gogh"], "style", style_clf, object_clf, world.eval_config(),
                                progress=False)
# the world's held-out wordings, across its objects: "van gogh art of a cat", "van gogh art of a dog"
result = ev.attack(pipe, "van gogh", "paraphrase", domain="style", classifier=style_clf, seed=0, world=world,
                   seeds=1, num_inference_steps=3, progress=False)
print(f"UA {scores.ua:.1f}; held-out wordings {result.details['templates']}: robust UA {result.robust_ua:.1f}")
# --8<-- [end:world]
