"""Errors a user can act on: the CLI prints their message and exits non-zero, without a traceback."""


class AlignkitError(Exception):
    """Base class: the message names the file, line or field and says what is wrong."""


class ConfigError(AlignkitError):
    """A config file or override is invalid."""


class DataError(AlignkitError):
    """An input data file is invalid; the message lists every problem with its line."""

    def __init__(self, path, problems: list[str]):
        self.path = path
        self.problems = problems
        shown = "\n".join(f"  {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{path}: {len(problems)} problem(s)\n{shown}{more}")


class ModelLoadError(AlignkitError):
    """A model path or file is missing, of an unknown kind, or corrupt."""
