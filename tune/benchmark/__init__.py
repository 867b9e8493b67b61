"""Benchmarks whose trials are ``spai train`` runs, run as Ray Tune searches (:mod:`tune.search`).

``spai benchmark cross-generator`` (:mod:`.cross_generator`): GenImage's cross-generator matrix (its Table 4), one
model per training generator (or per generator left out), each tested on every generator. Its config is in
:mod:`.config`, the training sets of its rows in :mod:`.sets`, and the matrix, its tables and heat map in
:mod:`.matrix`.
"""
