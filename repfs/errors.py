"""Domain errors: an operation cannot be done as asked.

Every layer raises a subclass of `DomainError` with a one-line message for the user and a
`kind` that says what sort of refusal it is. The kinds are about the domain, not about any
transport: the control port alone maps them to HTTP statuses (repfs/control.py), and the CLI
prints the message.

| kind | meaning |
|---|---|
| invalid | the request itself is wrong (bad name, bad value, undecodable data) |
| not_found | it names something that does not exist (a snapshot, a destination) |
| conflict | it is valid but the site's state does not allow it now (exists, mounted, wrong role) |
| busy | try again later: a resource is temporarily exhausted |
| failed | the operation was attempted and failed (a helper process died, an I/O error) |
"""

from __future__ import annotations

KINDS = ("invalid", "not_found", "conflict", "busy", "failed")


class DomainError(Exception):
    """A one-line reason an operation cannot be done, and its kind (one of KINDS)."""

    default_kind = "invalid"

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        kind = self.default_kind if kind is None else kind
        if kind not in KINDS:
            raise ValueError(f"unknown error kind {kind!r} (one of {', '.join(KINDS)})")
        self.kind = kind
