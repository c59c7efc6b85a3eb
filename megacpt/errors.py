"""The one exception type for user errors.

Library code raises `UserError` (or a subclass) for bad configs, data and checkpoints; only the CLI turns it
into a one-paragraph message and exit code 2. Nothing below the CLI calls `sys.exit`.
"""


class UserError(Exception):
    """Bad input from the user: a config key, a file or a path, and what was expected."""


class ConfigError(UserError):
    """A config value is wrong. `key` is the dotted path of the offending key."""

    def __init__(self, key: str, message: str, source: str | None = None):
        self.key = key
        self.message = message
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"config key '{key}'{where}: {message}")
