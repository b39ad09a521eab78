"""Errors caused by the user's input: main.py prints them as one line, no traceback."""


class UserError(Exception):
    """A mistake the user can fix (config, paths, data, checkpoints). The message says how."""


class ConfigError(UserError):
    pass


class CheckpointError(UserError):
    pass


class DataError(UserError):
    pass
