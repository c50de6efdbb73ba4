"""The ``vmemu`` command: tours and demos of the emulated address space."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``vmemu`` and ``python -m vmemu``."""
    parser = argparse.ArgumentParser(prog="vmemu", description=__doc__)
    sub = parser.add_subparsers(dest="cmd")
    sub.add_parser("tour", help="a narrated run through page tables, faults, fork and signals")
    tr = sub.add_parser("trace", help="the timeline of a userfault handled by a handler task")
    tr.add_argument("--seed", type=int, default=1, help="scheduler seed of the simulation")
    args = parser.parse_args(argv)
    if args.cmd == "trace":
        from vmemu.tour import userfault_demo

        _notes, timeline = userfault_demo(args.seed)
        print(timeline)
        return 0
    if args.cmd == "tour":
        from vmemu.tour import run_tour

        run_tour()
        return 0
    parser.print_help(sys.stdout)
    return 0
