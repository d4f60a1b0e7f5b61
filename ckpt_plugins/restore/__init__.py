"""Restore: ``read`` finds and reads a checkpoint (ours or a foreign format), ``targets`` selects,
renames and loads what was read into targets (tensors, modules, optimizers) with checks."""
