"""Sharded state (DTensor: FSDP2, tensor parallel, 2-D meshes): every rank saves its own chunks,
and a restore reads only the byte ranges each rank's target shards need (docs/sharded.md).

``layout`` (where a local shard lies in the global tensor), ``format`` (the manifest's ``sharded``
section), ``save`` (what a rank writes), ``read`` (ranged reads, assembling boxes), ``targets``
(filling sharded modules and optimizers), ``consolidate`` (a full model, streamed).
"""
