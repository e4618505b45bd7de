"""Errors a user sees as one line (the CLI prints them without a traceback)."""


class ApoError(Exception):
    """A problem the user can fix: bad input, a missing file, a wrong option."""


class DataError(ApoError):
    """A malformed record. Names the file, the record (line or row) and the reason."""

    def __init__(self, path, record, reason):
        self.path, self.record, self.reason = str(path), record, reason
        where = f"{self.path}:{record}" if record is not None else self.path
        super().__init__(f"{where}: {reason}")
