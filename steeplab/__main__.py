"""Command line of the lab: ``python -m steeplab up|down|status|inventory``."""
from __future__ import annotations

import argparse
import sys

from . import Lab, LabError, make_lab


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m steeplab",
                                description="Local multi-node PostgreSQL lab on wheel servers")
    p.add_argument("--dir", default=".lab/demo", help="lab directory (default .lab/demo)")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="create and start N nodes (replaces a lab in --dir)")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--pg", default="18",
                    help="major(s), comma separated and cycled: 18, 17 or 17,18")
    up.add_argument("--inventory", help="where to write the inventory (default <dir>/inventory.yml)")
    sub.add_parser("down", help="stop all nodes and remove the lab")
    sub.add_parser("stop", help="stop all nodes, keep data")
    sub.add_parser("start", help="start all nodes")
    sub.add_parser("status", help="list nodes")
    inv = sub.add_parser("inventory", help="(re)write the inventory")
    inv.add_argument("--out")
    args = p.parse_args(argv)
    try:
        if args.cmd == "up":
            majors = [int(x) for x in args.pg.split(",")]
            if args.nodes < 1:
                raise LabError("--nodes must be at least 1")
            lab = make_lab(args.dir, args.nodes, majors)
            path = lab.write_inventory(args.inventory)
            for n in lab.nodes:
                print(f"{n.name}: PostgreSQL {n.major} on {n.host}:{n.port}")
            print(f"inventory: {path}")
        elif args.cmd == "down":
            Lab.load(args.dir).destroy()
            print(f"lab {args.dir} removed")
        elif args.cmd == "stop":
            Lab.load(args.dir).stop()
        elif args.cmd == "start":
            Lab.load(args.dir).start()
        elif args.cmd == "status":
            for n in Lab.load(args.dir).nodes:
                print(f"{n.name}: PostgreSQL {n.major} {n.host}:{n.port} "
                      f"{'running' if n.is_running() else 'stopped'}")
        elif args.cmd == "inventory":
            print(Lab.load(args.dir).write_inventory(args.out))
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
