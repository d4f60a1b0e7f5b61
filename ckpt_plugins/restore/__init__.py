"""Restore: ``read`` finds and reads a checkpoint (ours or a foreign format), ``select`` picks and
renames key paths and reads only the tensors still needed, ``targets`` loads the result into
targets (tensors, modules, optimizers) with kind, shape and dtype checks."""
