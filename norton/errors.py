"""The one exception type for bad user input.

Everything a user can get wrong (a rate, a rank, a name, a file) raises a
``NortonError`` whose message names the bad value and what is accepted; the CLI
turns it into one line on stderr and exit status 2.
"""


class NortonError(ValueError):
    """Invalid input: the message says what was given and what is accepted."""
