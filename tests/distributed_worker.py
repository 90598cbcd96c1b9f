"""Run by tests/test_distributed.py in 2 CPU processes (``torch.distributed.run``, gloo), through accelerate."""

import sys

import torch

torch.set_num_threads(1)

from accelerate import Accelerator  # noqa: E402

import diffusers_unlearn as du  # noqa: E402

TRAIN = dict(steps=6, sampling_steps=4, num_trajectories=2, learning_rate=1e-2)
DATA_PARALLEL = dict(concept="van gogh", domain="style", seed=0, batch_size=2,
                     regularizers=[du.GradientProjection(keep=["monet"], neighbors=2)], **TRAIN)
MERGE_REQUESTS = [dict(concept=c, domain=d, seed=i, **TRAIN)
                  for i, (c, d) in enumerate([("van gogh", "style"), ("dog", "object"), ("cat", "object")])]


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
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
