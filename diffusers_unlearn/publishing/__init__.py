"""Publishing an unlearned model: diffusers-format folders and LoRAs (``export.py``), the model card
(``model_card.py``) and the Hub push (``hub.py``)."""
