#!/usr/bin/env python3
"""`curl` and `sudo` on the fake gcloud's TPU workers (tests/fakes/gcloud.py).

curl answers the GCE metadata server's questions a TPU worker can ask about its slice
(agent-worker-number, worker-network-endpoints), with the Metadata-Flavor: Google header
that the real server requires; any other URL fails (the workers have no network). sudo
always fails: the fake workers can't install anything.
"""

import os
import sys

METADATA = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"


def fail(message, code):
  print(f"fake TPU worker {os.environ.get('FAKE_GCLOUD_WORKER', '?')}: {message}", file=sys.stderr)
  return code


def curl(args):
  headers, urls, fail_on_http_error = [], [], False
  i = 0
  while i < len(args):
    arg = args[i]
    if arg == "-H" and i + 1 < len(args):
      headers.append(args[i + 1].replace(" ", "").lower())
      i += 1
    elif arg.startswith("-") and not arg.startswith("--") and set(arg[1:]) <= set("sSfL"):
      fail_on_http_error |= "f" in arg
    elif arg in ("--silent", "--show-error", "--fail", "--location"):
      fail_on_http_error |= arg == "--fail"
    elif arg.startswith("-"):
      return fail(f"curl {arg} is not supported by the fake", 2)
    else:
      urls.append(arg)
    i += 1
  if len(urls) != 1 or not urls[0].startswith(METADATA):
    return fail(f"curl {' '.join(args)}: no network on the fake workers", 6)
  if "metadata-flavor:google" not in headers:
    return fail("the metadata server needs the header Metadata-Flavor: Google", 22)
  n = int(os.environ["FAKE_GCLOUD_WORKERS"])
  values = {
    "agent-worker-number": os.environ["FAKE_GCLOUD_WORKER"],
    "worker-network-endpoints": ",".join("unknown:unknown:127.0.0.1" for _ in range(n)),
  }
  key = urls[0][len(METADATA) :]
  if key not in values:
    if fail_on_http_error:
      return 22
    print("404 page not found")
    return 0
  print(values[key], end="")
  return 0


def sudo(args):
  return fail(f"sudo {' '.join(args)}: the fake TPU workers have no sudo", 1)


if __name__ == "__main__":
  tool, *rest = sys.argv[1:]
  sys.exit({"curl": curl, "sudo": sudo}[tool](rest))
