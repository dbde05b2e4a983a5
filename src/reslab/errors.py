"""The one exception type for problems a user can fix (bad data, bad checkpoint, bad option).

The CLI prints it as a single line and exits non-zero; library callers can catch it. It subclasses
ValueError so that `except ValueError` in user code keeps working."""


class ReslabError(ValueError):
    pass
