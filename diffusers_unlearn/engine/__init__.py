"""The engine: one request described and validated (``request.py``, ``training_config.py``, the library's defaults
in ``defaults.py``), served (``trainer.py``: trained or solved), checked (``erasure_check.py``,
``classifier_check.py``, ``escalation.py``) and recorded (``ledger.py``, ``state.py``, ``saved_folder.py``);
``audit.py`` draws what each request changed."""
