"""``ProvqError``: a failure the user can fix, reported by the entry points as one line.

Raise it (or a subclass) with a message that names the file, key or value at fault and the fix;
``provq-fit`` and the other entry points print ``<program>: error: <message>`` and exit non-zero
instead of a traceback.
"""

from __future__ import annotations


class ProvqError(RuntimeError):
    """A user-fixable failure; its message is one line naming what is wrong and the fix."""

    exit_code = 1
