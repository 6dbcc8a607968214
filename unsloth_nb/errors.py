"""The one error type users see: a short paragraph that names the problem and the fix."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a plan that cannot fit. The CLI prints the message (no traceback) and exits 1."""
