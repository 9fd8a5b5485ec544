"""Entry points: ``provq-fit``, ``provq-sweep``, ``provq-tokenize`` / ``provq-decode``, the
TopoDisc demo.

They sit above the core, ``callbacks`` and ``datamodules`` and import from them; nothing below
imports from here (``tests/core/test_import_graph.py``).
"""
