"""Drop-in scoring functions for the late-interaction libraries, computed with maxsim.

- :mod:`maxsim.integrations.pylate`: PyLate's ``colbert_scores``, ``colbert_scores_pairwise`` and
  ``colbert_kd_scores``, and ``patch()`` / ``unpatch()`` to make PyLate itself use them.
- :mod:`maxsim.integrations.colpali`: colpali-engine's ``score_multi_vector``.

Neither module imports the library it stands in for (only ``patch()`` imports PyLate).
"""
