"""The one exception of the transfer code: an OSError with a typed failure code beside its errno."""

from __future__ import annotations

from etfs.protocol.transfer import FailureCode, code_for_errno


class TransferError(OSError):
    """``code`` says what a program should know (see `FailureCode`); the text is for people."""

    def __init__(self, errno: int, message: str, code: FailureCode | None = None) -> None:
        super().__init__(errno, message)
        self.code = code if code not in (None, FailureCode.NONE) else code_for_errno(errno)


def failure_code(exc: OSError) -> FailureCode:
    """The typed code of any OSError (ours carry one, others are classified by errno)."""
    return exc.code if isinstance(exc, TransferError) else code_for_errno(exc.errno or 0)
