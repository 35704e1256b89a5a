"""Sampling new models from a pretrained SANE run (paper Algorithm 3).

- ``config.py``: :class:`SampleConfig`, the job's settings.
- ``prompts.py``: which checkpoints prompt the distribution, preprocessed and encoded as the run would.
- ``kde.py``: :class:`TokenKDE`, per-token KDE (and the Gaussian prior) drawn independently per token.
- ``models.py``: haloed decoding to state dicts, BN-conditioning, evaluation, fine-tuning.
- ``job.py``: :func:`run_sample`, the Ray batch job; ``novelty.py``: comparisons with the zoo and prompts;
  ``report.py``: tables, plot, summary.
"""
