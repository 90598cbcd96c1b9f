"""Run by tests/test_distributed.py in 2 CPU processes (``torch.distributed.run``, gloo), through accelerate."""

import json
import sys

import torch

torch.set_num_threads(1)

from accelerate import Accelerator  # noqa: E402

import diffusers_unlearn as du  # noqa: E402
from diffusers_unlearn import bench  # noqa: E402
from diffusers_unlearn.evaluation import EvalConfig, evaluate_unlearning  # noqa: E402

TRAIN = dict(steps=6, sampling_steps=4, num_trajectories=2, learning_rate=1e-2)
DATA_PARALLEL = dict(concept="van gogh", domain="style", seed=0, batch_size=2,
                     regularizers=[du.GradientProjection(keep=["monet"], neighbors=2)], **TRAIN)
MERGE_REQUESTS = [dict(concept=c, domain=d, seed=i, **TRAIN)
                  for i, (c, d) in enumerate([("van gogh", "style"), ("dog", "object"), ("cat", "object")])]
EVAL_STYLES, EVAL_OBJECTS = ["van gogh", "monet", "picasso"], ["dog", "cat"]
# 12 images in batches of 5: 3 batches, shared out unevenly (two to the first process, one to the second)
EVAL = dict(styles=EVAL_STYLES, objects=EVAL_OBJECTS, template="a {object} in {style} style", seeds=[3, 5],
            num_inference_steps=3, guidance_scale=3.0, batch_size=5)
BENCH_REQUESTS = 2


class ChannelClassifier:
    """The label of an image's brightest mean colour channel; counts the images it is shown."""

    def __init__(self, labels):
        self.labels = list(labels)
        self.seen = 0

    def __call__(self, images):
        self.seen += len(images)
        return [self.labels[int(c) % len(self.labels)] for c in images.mean(dim=(2, 3)).argmax(dim=1)]


def tiny_bench_world():
    config = EvalConfig(**EVAL)
    return bench.BenchWorld("tinyworld", config, lambda: du.testing.tiny_pipeline(seed=0),
                            ChannelClassifier(EVAL_STYLES), ChannelClassifier(EVAL_OBJECTS),
                            heldout_templates=["{style} art of a {object}"], heldout_others=2)


def tiny_bench_settings():
    # solved (the same solve in every process) and trained (data-parallel: a batch of 2, one sample per process)
    return bench.BenchSettings(requests=BENCH_REQUESTS, protocols=["closed_form", "sequential"],
                               hparams=bench.Hyperparameters(steps=2, batch_size=2), seed=0)


def main(out: str) -> None:
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, accelerator.num_processes
    rank = accelerator.process_index
    # every process writes its own copy, so the test can check that they agree
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    pipe.unlearn(accelerator=accelerator, progress=False, **DATA_PARALLEL)
    pipe.save_unlearning(f"{out}/data_parallel/rank{rank}")
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    pipe.unlearn_parallel(MERGE_REQUESTS, strategy="ties", accelerator=accelerator, progress=False)
    pipe.save_unlearning(f"{out}/merge/rank{rank}")

    # an evaluation launched on 2 processes shares out its images without being told
    accelerator.wait_for_everyone()  # rank 0's folder is written
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    pipe.load_unlearning(f"{out}/data_parallel/rank0", replace=True)  # rank 0's adapters in both processes
    style_clf, object_clf = ChannelClassifier(EVAL_STYLES), ChannelClassifier(EVAL_OBJECTS)
    scores = evaluate_unlearning(pipe, ["van gogh"], "style", style_clf, object_clf, EvalConfig(**EVAL),
                                 progress=False)
    torch.save(scores.images, f"{out}/eval_images_rank{rank}.pt")
    with open(f"{out}/eval_rank{rank}.json", "w") as f:
        json.dump({"scores": scores.to_dict(), "seen": [style_clf.seen, object_clf.seen]}, f)

    # the bench's evaluations too: every process serves the same requests, the images are shared out
    result = bench.run_bench(tiny_bench_world(), tiny_bench_settings(), progress=False, log=None)
    with open(f"{out}/bench_rank{rank}.json", "w") as f:
        json.dump(result, f)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
