#!/usr/bin/env python3
"""A stand-in `scontrol` for tests: only `scontrol show hostnames [HOSTLIST]`.

Anything else exits 2 with a message. HOSTLIST defaults to $SLURM_JOB_NODELIST, as in
SLURM, and may use SLURM's brackets: node[1-3,7],gpu05.
"""

import os
import re
import sys


def expand(hostlist: str) -> list[str]:
  """'n[01-03,7],x' -> ['n01', 'n02', 'n03', 'n7', 'x'] (one bracket group per name)."""
  hosts = []
  for prefix, ranges, suffix in re.findall(r"([^,\[]+)(?:\[([^\]]*)\])?([^,\[]*)", hostlist):
    if not ranges:
      hosts.append(prefix + suffix)
      continue
    for part in ranges.split(","):
      lo, _, hi = part.partition("-")
      for i in range(int(lo), int(hi or lo) + 1):
        hosts.append(f"{prefix}{i:0{len(lo)}d}{suffix}")
  return hosts


def main(args):
  if args[:2] != ["show", "hostnames"] or len(args) > 3:
    print(
      f"scontrol {' '.join(args)}: the fake scontrol only does `show hostnames [LIST]` "
      "(tests/fakes/scontrol.py)",
      file=sys.stderr,
    )
    return 2
  hostlist = args[2] if len(args) == 3 else os.environ.get("SLURM_JOB_NODELIST", "")
  if not hostlist:
    print("scontrol: error: no hostlist given and SLURM_JOB_NODELIST is not set", file=sys.stderr)
    return 1
  print("\n".join(expand(hostlist)))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
