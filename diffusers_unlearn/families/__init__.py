"""Model families: what differs between the pipelines this package unlearns on, one description each.

``registry.py`` holds ``ModelFamily`` and ``register_family`` (a new family is one description and one
registration line), ``conditioning.py`` the ``Conditioner`` interface and its UNet form (SD, SDXL), ``flow.py`` the
flow-matching transformers (SD3, Flux), ``tiny.py`` tiny real pipelines of each family built offline.
"""
