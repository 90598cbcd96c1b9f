"""The K/V layers every request edits: a request's artifact and its peft LoRA form (``adapters.py``), the stacked
or folded state of many requests (``composition.py``), merge strategies (``merging.py``) and the text states those
layers read in joint transformers (``text_states.py``)."""
