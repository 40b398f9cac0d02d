"""Name -> factory lookups whose errors list the valid names."""

import difflib

from flaxtrain.errors import UserError


def lookup(table: dict, name: str, kind: str, key: str):
  """Returns `table[name]` or raises a UserError naming the valid choices."""
  if name in table:
    return table[name]
  close = difflib.get_close_matches(str(name), list(table), n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  raise UserError(
    f"Unknown {kind} {name!r}{hint}: set --config.{key} to one of {', '.join(sorted(table))}."
  )


def missing_field(kind: str, name: str, err: Exception) -> UserError:
  field = err.args[0] if err.args else err
  return UserError(
    f"The {kind} {name!r} needs config field {field!r}, which the config file does not "
    f"define: add it to the config's {kind} section."
  )
