"""User-facing errors.

Every error a user can cause (bad file, bad recipe, bad path) is a `WorkbenchError` whose message
names the file, the field and what was expected. The CLI prints the message and exits with status 2
instead of showing a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class WorkbenchError(Exception):
    """An error caused by the user's input, with a message meant to be read by that user."""


class FormatError(WorkbenchError):
    """A model file that cannot be read: corrupt, truncated, or not a safetensors file."""


class UnknownModelError(WorkbenchError):
    """A readable file whose keys match none of the architectures we know."""


class RecipeError(WorkbenchError):
    """A recipe that does not validate; the message lists every problem with file and line."""


class OutputExistsError(WorkbenchError):
    """An output path that already exists while the user did not ask to overwrite it."""


class UnsupportedError(WorkbenchError):
    """Something the workbench does not do (an architecture a feature lacks, NF4 without
    bitsandbytes, ...); the message says what is supported instead."""


UnsupportedError = UnsupportedError  # the old name, kept while branches written against it land
