"""The error users see in one line, without a traceback."""

import contextlib
import re


class UserError(ValueError):
  """A problem with the user's options or files, worded with the flag (keyword) it names."""


class Cancelled(Exception):
  """A generate call its caller stopped (an interrupt, or a `generate_iter` closed early): each
  replica ends once its dispatch in flight is read."""


def as_keywords(e: UserError) -> UserError:
  """`e` worded for the Python API, where options are keywords: a leading "--name:" reads
  "name:", "--name=value" reads "name=value", any other "--name" reads "name=" (the keyword).
  A "--" inside a word or a path (a hub snapshot's "models--org--name") is left as it is."""
  flag = r"(?<![\w/.~-])--(\w+)"
  text = re.sub(r"^--(\w+):", r"\1:", str(e))
  text = re.sub(flag + "=", r"\1=", text)
  return UserError(re.sub(flag, r"\1=", text))


@contextlib.contextmanager
def keywords():
  """Within it, a UserError is raised again worded with keywords (`as_keywords`), alone."""
  try:
    yield
  except UserError as e:
    raise as_keywords(e) from None

