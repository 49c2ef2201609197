"""The one error type for bad user input, raised by every layer and caught by the CLI.

It lives in `mesh/` because `mesh` is the bottom of the dependency graph: every other layer may
import it. The CLI turns it into a one-line message and exit code 2; anything else is a bug.
"""


class WaferError(Exception):
    """A problem with what the user asked for (a path, a shape, a preset, a budget)."""
