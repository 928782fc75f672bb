"""The one error type for bad input, and the one for an output that fails --verify.

Every problem a user can fix (a wrong flag, a missing or damaged file, a param_map that does not fit
the checkpoint) is raised as `ConvertInputError`. Its message names the file or flag, what was
expected and what was found, and how to fix it, because users read it in the log of an unattended run.
"""


class ConvertInputError(Exception):
    """Bad input: the message says which file or flag, expected vs found, and the fix.

    >>> str(ConvertInputError("--tp-size 3", expected="2", found="3", fix="pass --tp-size 2"))
    '--tp-size 3; expected 2; found 3 -> pass --tp-size 2'
    """

    def __init__(self, what: str, expected: str = "", found: str = "", fix: str = ""):
        parts = [what]
        if expected:
            parts.append(f"expected {expected}")
        if found:
            parts.append(f"found {found}")
        message = "; ".join(parts)
        if fix:
            message += f" -> {fix}"
        super().__init__(message)


class VerificationError(RuntimeError):
    """An output read back (with mindspore.load_checkpoint, or torch.load on the way back) differs
    from its source: a fault of the converter or the disk, not of the input."""
