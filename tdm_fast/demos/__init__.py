"""Demos on stock diffusers pipelines.

- :mod:`tdm_fast.demos.t2i`: tiny trained text-to-image pipelines of stock diffusers classes
  (SD1.5-style and SD3-style) on the digits data, shipped as package assets.
- :mod:`tdm_fast.demos.t2i_demo`: ``tdm-fast demo --pipeline sd15|sd3``, which distils one of them
  through the ``--preset`` path (LoRA roles, unify K ∈ {1, 2, 4}) and scores it through the stock
  pipeline.
"""
