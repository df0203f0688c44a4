"""Built-in teachers and their demos.

- :mod:`tdm_fast.demos.toy2d` and :mod:`tdm_fast.demos.demo_toy`: the 2-D toy teacher (an MLP on a
  mixture of Gaussians) and ``tdm-fast demo --toy``.
- :mod:`tdm_fast.demos.digits` and :mod:`tdm_fast.demos.demo_digits`: the class-conditional UNet on
  scikit-learn's 8×8 digits and ``tdm-fast demo`` (the embedded default).
- :mod:`tdm_fast.demos.teachers`: every shipped digits-scale teacher (:data:`TEACHERS`) by name.
- :mod:`tdm_fast.demos.t2i`: tiny trained text-to-image pipelines of stock diffusers classes
  (SD1.5-style and SD3-style) on the digits data, shipped as package assets.
- :mod:`tdm_fast.demos.t2i_demo`: ``tdm-fast demo --pipeline sd15|sd3``, which distils one of them
  through the ``--preset`` path (LoRA roles, unify K ∈ {1, 2, 4}) and scores it through the stock
  pipeline.
"""
