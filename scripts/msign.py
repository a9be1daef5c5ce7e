#!/usr/bin/python3
"""msign.py — MSign keys and request signatures (SPEC 5) from the command
line; the implementation is the `muse.msign` module (this file keeps the
old import name `msign` working).

  msign.py keygen PREFIX      writes PREFIX.key (private, 0600) and
                              PREFIX.pub; prints the key id
  msign.py keyid FILE         prints the key id of a PEM public or private key
  msign.py sign --key FILE METHOD URL [--body-file F] [--key-id ID]
"""
import sys

from muse.msign import *  # noqa: F401,F403
from muse.msign import main

if __name__ == "__main__":
    sys.exit(main())
