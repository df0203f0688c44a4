"""The generic parts of training, apart from the method's phases (:mod:`tdm_fast.trainer`):

- :mod:`.conditions` — condition samplers (:class:`ClassConditions`, :class:`EmbeddingConditions`);
- :mod:`.optim` — optimisers, the LR schedule and the EMA of the student;
- :mod:`.compile` — ``torch.compile`` of the networks (``config.compile``);
- :mod:`.checkpoints` — checkpoints, resume and the saved student.
"""
