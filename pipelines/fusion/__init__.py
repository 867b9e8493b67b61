"""Sem-SPAI head training: a fusion head on a feature table (``spai fusion extract``), with Ray Train, into one fused
checkpoint that ``spai score`` runs end to end."""
