"""The state tree: nested training state as strict JSON plus a flat dict of tensors, and back.

``walk`` is the one walker over nested state, by dotted key path (live objects and encoded trees
alike); ``codec`` flattens and rebuilds (the format spec is its docstring); ``tags`` holds the
tagged leaf encoders, the validating decoder and the encoded tree's children view. No pickle
anywhere.
"""
