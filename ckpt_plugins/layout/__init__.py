"""Layout: what a checkpoint directory holds and how a checkpoint becomes visible.

``naming`` (folder names, natural sort), ``commit`` (the atomic commit protocol, listing only
committed checkpoints, cleanup of leftovers, deletion) and ``lock`` (one writer per directory).
"""
