"""The error users see in one line, without a traceback."""


class UserError(ValueError):
  """A problem with the user's options or files, worded with the flag (keyword) it names."""
