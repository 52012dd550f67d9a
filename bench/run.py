"""Run every benchmark in bench/ (each script writes its own section of docs/benchmarks.md)."""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    rc = 0
    for script in sorted(HERE.glob("*.py")):
        if script.name in ("run.py", "__init__.py") or script.name.startswith("_"):
            continue
        print("== %s" % script.name, flush=True)
        rc |= subprocess.call([sys.executable, str(script)] + sys.argv[1:])
    sys.exit(rc)
