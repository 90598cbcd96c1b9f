"""What a pipeline gains, one capability per mixin as in diffusers' loaders: ``unlearning.py``
(``RequestStreamMixin``: unlearn, audit, rollback, fold), ``saving.py`` (``SavingMixin``: save, export, card, push),
``attach.py`` (``UnlearnMixin``, both combined, and ``attach``)."""
