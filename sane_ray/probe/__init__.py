"""Property prediction from model embeddings (the paper's Tables 1, 2, 9, 10).

Baselines (:mod:`.features`: flattened weights W, weight statistics s(W)), linear probes
(:mod:`.linear`), the probe job (:mod:`.job`) with its tables and figures
(:mod:`.report`), and the probe-quality signal during pretraining (:mod:`.signal`).
"""
