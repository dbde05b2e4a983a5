"""The one exception type for problems a user can fix (bad data, bad checkpoint, bad option).

The CLI prints it as a single line and exits non-zero; library callers can catch it. It subclasses
ValueError so that `except ValueError` in user code keeps working."""


class ReslabError(ValueError):
    pass


def one_line(e: BaseException) -> str:
    """An error's message as a user reads it. Raised in a DataLoader worker, PyTorch re-raises an error with
    the worker's whole traceback as its message ("Caught ... in DataLoader worker process 0. Original
    Traceback ..."), whose last line is the error itself after its qualified name: that line, without the
    name. Errors that wrap another (a failed evaluation's) pass the wrapped one through here first."""
    import re
    text = str(e).strip() or type(e).__name__
    if text.startswith("Caught ") and "Original Traceback" in text:
        name, sep, rest = text.splitlines()[-1].partition(": ")
        text = rest if sep and re.fullmatch(r"[A-Za-z_][\w.]*", name) else text.splitlines()[-1]
    return text


def described(e: BaseException) -> str:
    """one_line(e), after the type's name where the type says something a ReslabError's message does not
    ("OSError: [Errno 5] Input/output error")."""
    return one_line(e) if isinstance(e, ReslabError) else f"{type(e).__name__}: {one_line(e)}"


def bad_batch_advice(e: BaseException) -> str:
    """What to do after a training batch could not be read: a file that cannot be decoded is a ReslabError
    naming it; anything else (a worker killed for memory, a vanished mount) has another cause."""
    return ("fix or replace the file (or resume with --on-corrupt skip)" if isinstance(e, ReslabError)
            else "fix the cause")
