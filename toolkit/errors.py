"""The exception for bad user input, shared by every layer (it imports nothing).

Raise :class:`InputError` on purpose when something the user handed us is wrong: a file, a field,
an option, an array. The message names what is wrong and where ("expected X, got Y" with the file,
field path or line). The ``rlhf`` command line prints it as one line and exits with code 2. Any other
exception is a bug in the toolkit: exit code 1, with the traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """The user's input is wrong; ``str(err)`` is the message shown to them (one line per problem)."""
