"""The state tree: nested training state as strict JSON plus a flat dict of tensors, and back.

``codec`` flattens and rebuilds (the format spec is its docstring); ``tags`` holds the tagged
leaf encoders, the validating decoder and the walker. No pickle anywhere.
"""
