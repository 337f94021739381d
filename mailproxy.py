#!/usr/bin/env python3
"""Run mailproxy from a source checkout: `python mailproxy.py -c mail.conf`.

A launcher only; the program lives in the mailproxy/ package next to it.
"""

from mailproxy.cli import main

if __name__ == "__main__":
    main()
