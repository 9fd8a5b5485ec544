"""Protein structure tokenizer: parsing, cache, SE(3)-invariant encoder, frame decoder, losses.

Submodules are small and import-light; the Lightning module lives in ``protein.tokenizer``.
"""
