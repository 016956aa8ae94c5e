"""`make test` runs pytest-xdist with `--dist loadgroup`, so that the modules marked xdist_group (their
fixtures take minutes) run in one worker. That rests on xdist tagging each grouped test's id, which
pytest 9.2's structured ids silently undo (pytest-xdist issue 1386: the groups are spread, their
fixtures set up in every worker); setup.py keeps pytest below 9.2. This checks the grouping itself."""
import re
import subprocess
import sys


def test_loadgroup_keeps_a_group_in_one_worker(tmp_path):
    for module in ("a", "b"):
        (tmp_path / f"test_{module}.py").write_text(
            "import pytest\n\npytestmark = pytest.mark.xdist_group('one')\n\n\n"
            "@pytest.mark.parametrize('i', range(4))\ndef test_it(i):\n    pass\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v", "-p",
                           "no:cacheprovider", str(tmp_path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    workers = re.findall(r"\[(gw\d+)\].* PASSED .*test_it", proc.stdout)
    assert len(workers) == 8 and len(set(workers)) == 1, proc.stdout[-3000:]
