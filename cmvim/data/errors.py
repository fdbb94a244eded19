"""One exception type for every data problem a site can have."""
from __future__ import annotations

from pathlib import Path


class DataError(Exception):
    """A problem with a site's data: names the file, the subject and what is wrong.

    `str(err)` is for the hospital's own eyes (it contains the subject id and the
    path). `public_message()` is the form that may cross the network: the
    manifest row and the kind of problem, never the subject id or file name.
    """

    def __init__(self, problem: str, *, file: str | Path | None = None, subject: str | None = None,
                 row: int | None = None, column: str | None = None, kind: str | None = None):
        self.problem = problem
        self.file = str(file) if file is not None else None
        self.subject = subject
        self.row = row
        self.column = column
        self.kind = kind or "data"
        super().__init__(self._describe())

    def _describe(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"manifest row {self.row}")
        if self.subject is not None:
            where.append(f"subject {self.subject!r}")
        if self.column is not None:
            where.append(f"column {self.column!r}")
        if self.file is not None:
            where.append(self.file)
        return (": ".join(where) + ": " if where else "") + self.problem

    def with_context(self, *, subject: str | None = None, row: int | None = None,
                     column: str | None = None, file: str | Path | None = None) -> "DataError":
        """A copy with more context filled in (context already present wins)."""
        return DataError(self.problem, file=self.file or (str(file) if file else None),
                         subject=self.subject or subject, row=self.row if self.row is not None else row,
                         column=self.column or column, kind=self.kind)

    def public_message(self) -> str:
        where = [f"manifest row {self.row}"] if self.row is not None else []
        if self.column is not None:
            where.append(self.column)
        return (", ".join(where) + ": " if where else "") + f"{self.kind} problem"


class VisitProblems(DataError):
    """Every problem of one visit (each a DataError naming its file): the visit is skipped and each
    is listed, so a site fixes them in one pass instead of one per check. Reads as the first."""

    def __init__(self, errors: list[DataError]):
        self.errors = list(errors)
        first = self.errors[0]
        super().__init__(first.problem, file=first.file, subject=first.subject, row=first.row,
                         column=first.column, kind=first.kind)

    def with_context(self, **context) -> "VisitProblems":
        return VisitProblems([err.with_context(**context) for err in self.errors])


def each_problem(err: DataError) -> list[DataError]:
    """The problems a DataError stands for: one, or a visit's several."""
    return list(err.errors) if isinstance(err, VisitProblems) else [err]
