# A stream of requests from a plan file, interrupted and resumed, on the tiny offline pipeline.
# Run by tests/test_docs.py from a temporary folder.
from pathlib import Path

Path("stream.yaml").write_text("""\
# --8<-- [start:plan]
model: tiny                  # a world name, a pipeline folder or a Hub id
output: stream-out/          # relative to this file
strategy: sequential
defaults: {method: esd, domain: style, steps: 6, sampling_steps: 4, num_trajectories: 2, learning_rate: 1.0e-2}
requests:
  - concept: van gogh
    regularizers:
      - {name: gradient_projection, keep: [monet]}
  - concept: picasso
    regularizers:
      - {name: gradient_projection, keep: [monet]}
      - {name: l2_drift, weight: 1000}
# --8<-- [end:plan]
""")

# --8<-- [start:run]
import diffusers_unlearn as du


class Stop(Exception):
    pass


def stop_after_first(planned, record):   # simulates an interruption after the first request
    raise Stop


plan = du.load_plan("stream.yaml")          # the whole plan is checked before anything runs
try:
    du.run_plan(plan, after_request=stop_after_first)
except Stop:
    pass
result = du.run_plan(du.load_plan("stream.yaml"))   # a rerun loads the ledger and runs only what is missing
print(result)
# --8<-- [end:run]

# --8<-- [start:check]
pipe = du.load_pipeline("stream-out/")      # the folded pipeline folder, with its ledger
assert pipe.removed_concepts == ["van gogh", "picasso"]
# --8<-- [end:check]
