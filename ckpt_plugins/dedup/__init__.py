"""Unchanged tensors stored once (``dedup=True``).

:mod:`.index` decides per save which tensors are references to the previous checkpoint's data
(version counters on the training thread, per-tensor xxh3 digests on the writer) and writes the
rest into one new file of the directory's shared pool (:mod:`ckpt_plugins.layout.shared`);
:mod:`.read` follows references on restore; :mod:`.export` writes self-contained copies. The
manifest fields are described in docs/format.md, the behaviour in docs/dedup.md.
"""
