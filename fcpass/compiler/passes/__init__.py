"""Graph rewrites; each module is one pass with its invariant in the docstring."""
