"""Shared fixtures: real PostgreSQL labs and real ansible-playbook runs. No mocks."""
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
COLLECTIONS = ROOT / ".collections"
sys.path.insert(0, str(COLLECTIONS))  # ansible_collections.steep.repl -> the repo

from steeplab import make_lab  # noqa: E402

LAB_BASE = Path(os.environ.get("STEEP_TEST_LAB_ROOT", "/tmp/steep-tests"))


def _ensure_collection_link():
    link = COLLECTIONS / "ansible_collections" / "steep" / "repl"
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(ROOT)


_ensure_collection_link()


@pytest.fixture
def lab_factory():
    """``make(count=2, majors=(18,), **kw) -> Lab``; every lab is destroyed afterwards."""
    labs = []
    LAB_BASE.mkdir(parents=True, exist_ok=True)
    os.chmod(LAB_BASE, 0o755)

    def make(count=2, majors=(18,), **kw):
        lab = make_lab(LAB_BASE / uuid.uuid4().hex[:10], count, majors, **kw)
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.destroy()


class PlaybookResult:
    def __init__(self, proc, data):
        self.rc = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.data = data

    @property
    def stats(self):
        return (self.data or {}).get("stats", {})

    def changed(self):
        return sum(h.get("changed", 0) for h in self.stats.values())

    def failed(self):
        return sum(h.get("failures", 0) + h.get("unreachable", 0) for h in self.stats.values())

    def task_results(self, name_part):
        """[(host, result)] for every task whose name contains ``name_part``."""
        out = []
        for play in (self.data or {}).get("plays", []):
            for task in play.get("tasks", []):
                if name_part in task["task"]["name"]:
                    out.extend(task["hosts"].items())
        return out

    def changed_tasks(self):
        """[(host, task name)] of every task that reported a change."""
        out = []
        for play in (self.data or {}).get("plays", []):
            for task in play.get("tasks", []):
                for host, res in task["hosts"].items():
                    if res.get("changed"):
                        out.append((host, task["task"]["name"]))
        return out

    def failure_messages(self):
        msgs = []
        for play in (self.data or {}).get("plays", []):
            for task in play.get("tasks", []):
                for host, res in task["hosts"].items():
                    if res.get("failed") or res.get("unreachable"):
                        msgs.append("%s: %s" % (host, res.get("msg")))
        return msgs


def module_coverage_env():
    """With STEEP_MODULE_COVERAGE=<dir> (set by `make test`), modules run by ansible-playbook record
    coverage there too (ansible-core's AnsiballZ coverage hook); `make test` combines it with pytest's."""
    out = os.environ.get("STEEP_MODULE_COVERAGE")
    if not out:
        return {}
    rc = Path(out) / "modules.coveragerc"
    if not rc.exists():
        Path(out).mkdir(parents=True, exist_ok=True)
        rc.write_text("[run]\nparallel = True\ninclude =\n    */ansible_collections/steep/repl/plugins/*\n")
    return {"_ANSIBLE_ANSIBALLZ_COVERAGE_CONFIG": json.dumps({"config": str(rc), "output": str(Path(out) / ".coverage.module")})}


def run_playbook(playbook, inventory, extra_vars=None, check=False, diff=False, limit=None,
                 extra_args=(), timeout=900):
    """Run a real ansible-playbook with the JSON callback and return a PlaybookResult."""
    env = dict(os.environ)
    env.update(ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
               ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS),
               ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
               ANSIBLE_NOCOLOR="1")
    env.update(module_coverage_env())
    cmd = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory),
           str(ROOT / "playbooks" / playbook if "/" not in str(playbook) else playbook)]
    if extra_vars:
        cmd += ["-e", json.dumps(extra_vars)]
    if check:
        cmd.append("--check")
    if diff:
        cmd.append("--diff")
    if limit:
        cmd += ["--limit", limit]
    cmd += list(extra_args)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT),
                          timeout=timeout, check=False)
    try:
        start = proc.stdout.index("{")
        data = json.loads(proc.stdout[start:])
    except ValueError:
        data = None
    return PlaybookResult(proc, data)


@pytest.fixture
def playbook():
    return run_playbook
