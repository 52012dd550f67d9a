"""bench/stress.py: its argument checks (nothing is started on bad input) and the apply-error classification."""
import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "bench" / "stress.py"
spec = importlib.util.spec_from_file_location("steep_stress_tool", PATH)
stress = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stress)


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--keys", "0"], ["--writers", "0"], ["--seconds", "0"],
                                  ["--load", "-1"]])
def test_bad_arguments_start_nothing(argv, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        stress.main(argv + ["--root", str(tmp_path)])
    assert exc.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []          # no lab was created


def test_classify_apply_errors():
    deadlock = 'ERROR:  deadlock detected\nCONTEXT:  processing remote data for replication origin "pg_1"'
    restart = "ERROR:  replication origin with ID 2 is already active for PID 25663"
    exists = 'ERROR:  conflict detected on relation "public.hot": conflict=insert_exists'
    assert stress.classify([]) == set()
    assert stress.classify([deadlock, restart]) == {"deadlock"}
    assert stress.classify([exists, restart]) == {"other"}
    assert stress.classify([restart]) == set()
