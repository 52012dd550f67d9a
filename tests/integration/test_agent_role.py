"""The steep.repl.agent role in a real ansible-playbook: supervised processes on a 2-node lab (two agents on one
machine, different ports), idempotence, steep_agent_enabled: false, and a systemd unit systemd-analyze accepts."""
import json
import shutil
import subprocess
import urllib.error
import urllib.request

import pytest

from agent_support import setup_extension, wait_for
from steeplab import free_port


def get(port, path):
    try:
        with urllib.request.urlopen("http://127.0.0.1:%s%s" % (port, path), timeout=3) as r:
            return r.status, json.loads(r.read().decode())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())
    except OSError:
        return None, None


def changed_tasks(res):
    out = []
    for play in (res.data or {}).get("plays", []):
        for task in play.get("tasks", []):
            for host, r in task["hosts"].items():
                if r.get("changed"):
                    out.append((host, task["task"]["name"], {k: r.get(k) for k in ("results", "msg", "diff") if k in r}))
    return str(out)[:4000]


def test_role_process_systemd_idempotent_and_disabled(lab_factory, tmp_path, playbook):
    lab = lab_factory(count=2, majors=(18,))
    setup_extension(lab)
    prefix = tmp_path / "prefix"
    ports = {n.name: free_port() for n in lab.nodes}
    hv = dict((n.name, dict(steep_agent_enabled=True, steep_agent_http_port=ports[n.name], steep_agent_host="127.0.0.1"))
              for n in lab.nodes)
    gv = dict(steep_agent_prefix=str(prefix), steep_agent_service_manager="process", steep_agent_http_host="127.0.0.1",
              steep_agent_interval="0.5s", steep_agent_timeout="2s", steep_agent_unhealthy_threshold=2)
    inv = lab.write_inventory(tmp_path / "inv.yml", group_vars=gv, host_vars=hv)
    try:
        res = playbook("steep_agent.yml", inv)
        assert res.rc == 0, res.failure_messages() or res.stdout[-3000:]
        for n in lab.nodes:
            assert wait_for(lambda: get(ports[n.name], "/health")[0] == 200, 30), (prefix / "log").glob("*")
        assert wait_for(lambda: get(ports["node2"], "/status")[1]["coordinator"] == "node1", 20)
        conf = (prefix / "etc" / "steep-repl-node1.yml").read_text()
        assert "steep-lab-secret" not in conf and "password_env: STEEP_PW_NODE1" in conf
        env = prefix / "etc" / "steep-repl-node1.env"
        assert oct(env.stat().st_mode & 0o777) == "0o600"
        assert "steep-lab-secret" not in res.stdout  # no_log on the credentials

        # idempotent: a second run and a --check run change nothing
        again = playbook("steep_agent.yml", inv)
        assert again.rc == 0 and again.changed() == 0, changed_tasks(again)
        check = playbook("steep_agent.yml", inv, check=True, diff=True)
        assert check.rc == 0 and check.changed() == 0, changed_tasks(check)

        # the installed CLI talks to the running agent over its socket
        cli = prefix / "venv" / "bin" / "steep-repl"
        r = subprocess.run([str(cli), "--config", str(prefix / "etc" / "steep-repl-node1.yml"), "health", "--json"],
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0 and json.loads(r.stdout)["role"] == "coordinator" and "not running" not in r.stderr
    finally:
        for n in lab.nodes:
            ctl = prefix / ("steep-repl-%s-ctl" % n.name)
            if ctl.exists():
                subprocess.run([str(ctl), "stop"], capture_output=True, timeout=60, check=False)
    for n in lab.nodes:
        assert get(ports[n.name], "/liveness") == (None, None)

    # steep_agent_enabled: false -> nothing about the agent is touched
    other = tmp_path / "untouched"
    gv2 = dict(gv, steep_agent_prefix=str(other))
    inv2 = lab.write_inventory(tmp_path / "inv2.yml", group_vars=gv2)  # the lab default: steep_agent_enabled: false
    res = playbook("steep_agent.yml", inv2)
    assert res.rc == 0 and res.changed() == 0 and not other.exists()

    # systemd: the rendered unit passes systemd-analyze verify (same prefix: the virtualenv is reused)
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed")
    units = tmp_path / "units"
    units.mkdir()
    gv3 = dict(gv, steep_agent_service_manager="systemd", steep_agent_service_start=False,
               steep_agent_systemd_unit_dir=str(units), steep_agent_user="root", steep_agent_create_user=False)
    inv3 = lab.write_inventory(tmp_path / "inv3.yml", group_vars=gv3, host_vars=hv)
    res = playbook("steep_agent.yml", inv3, limit="node1")
    assert res.rc == 0, res.failure_messages() or res.stdout[-3000:]
    unit = units / "steep-repl-node1.service"
    text = unit.read_text()
    assert "Type=notify" in text and "Restart=on-failure" in text and "steep-lab-secret" not in text
    assert "EnvironmentFile=%s" % (prefix / "etc" / "steep-repl-node1.env") in text
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    problems = [line for line in (r.stdout + r.stderr).splitlines() if "steep-repl-node1" in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr
