"""The errors a user fixes by changing a flag, an argument or a file. Raised on any floor
(the data, the model, the commands); each command reports them as one line, exit code 2
(``rein.cli``), and the Python API lets them propagate as ValueErrors."""


class UsageError(ValueError):
    """A flag or argument that cannot work, named as its caller names it."""


class DataError(ValueError):
    """Bad data on disk (a missing folder, an unreadable file, an unknown label id),
    naming the file or folder."""
