"""The exception for bad user input, shared by every layer (it imports nothing).

Raise :class:`InputError` on purpose when something the user handed us is wrong: a file, a field,
an option, an array. The message names what is wrong and where ("expected X, got Y" with the file,
field path or line). The ``rlhf`` and ``rlhf-run`` command lines print it as one line and exit with
code 2. Any other exception is a bug: exit code 1, with the traceback. ``toolkit.errors`` re-exports
this class, so the toolkit and the runtime raise and catch one and the same type.
"""

from __future__ import annotations


class InputError(ValueError):
    """The user's input is wrong; ``str(err)`` is the message shown to them (one line per problem)."""
