"""The one exception type that reaches the user as a sentence, not a traceback."""


class UserError(Exception):
  """Something the user can fix: bad config, missing data, wrong workdir.

  `main` prints the message (one sentence saying what to do) and exits non-zero
  without a traceback unless --verbose is given.
  """
