"""User-facing errors: the message is one line (what is wrong, where, how to fix); the CLI prints it and exits 2."""


class UserError(Exception):
    pass


class ConfigError(UserError, ValueError):
    pass


class ConversionError(UserError):
    pass
