"""mixcli-evolve: the [search] table, genome decoding, strategies, the search loop, executors."""

import subprocess
import sys


def mixcli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mixcli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_the_plugin_adds_the_evolve_command():
    result = mixcli("evolve", "--help")
    assert result.returncode == 0, result.stderr
    assert "--resume" in result.stdout and "[[search.fitness]]" in result.stdout
