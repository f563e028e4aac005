"""The error users see in one line, without a traceback."""


class UserError(ValueError):
  """A problem with the user's options or files, worded with the flag (keyword) it names."""


class Cancelled(Exception):
  """A generate call its caller stopped (an interrupt, or a `generate_iter` closed early): each
  replica ends once its dispatch in flight is read."""
