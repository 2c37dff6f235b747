"""The output never destroys what the user did not name: inputs and the project are refused as
outputs, reads stay inside the model folders, interrupted and concurrent runs leave nothing."""

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tiny_models
from conftest import write_project
from test_project_errors import assert_one_line_error, run


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def linear_project(folder: Path, a, b, output="out/merged") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_project(folder, f"""
[models]
a = {{ path = "{a}", weight = 1.0 }}
b = {{ path = "{b}", weight = 1.0 }}
[method]
name = "linear"
[output]
path = "{output}"
""")


def leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


@pytest.mark.parametrize("out, how", [("models/ft1", "is the folder of model 'a'"),
                                      ("models/ft1/sub", "lies inside the folder of model 'a'"),
                                      ("models", "holds the folder of model 'a'")])
def test_force_never_replaces_an_input_model(tmp_path, llama_family, out, how):
    shutil.copytree(llama_family["ft1"], tmp_path / "models" / "ft1")
    before = digest(tmp_path / "models")
    project = linear_project(tmp_path / "proj", tmp_path / "models" / "ft1", llama_family["ft2"])
    assert_one_line_error(run("merge", project, "--out", tmp_path / out, "--force"), how,
                          "never writes over its inputs")
    assert digest(tmp_path / "models") == before
    assert leftovers(tmp_path / "models", "ft1") == [] and leftovers(tmp_path, "models") == []


def test_weights_linked_from_elsewhere_are_protected_where_they_are(tmp_path, llama_family):
    # a model folder whose weights are a link into another folder, as in the Hub cache
    (tmp_path / "store").mkdir()
    shutil.copyfile(llama_family["ft1"] / "model.safetensors", tmp_path / "store" / "weights.safetensors")
    shutil.copytree(llama_family["ft1"], tmp_path / "linked")
    (tmp_path / "linked" / "model.safetensors").unlink()
    (tmp_path / "linked" / "model.safetensors").symlink_to(tmp_path / "store" / "weights.safetensors")
    before = digest(tmp_path / "store")
    project = linear_project(tmp_path / "proj", tmp_path / "linked", llama_family["ft2"])
    assert_one_line_error(run("merge", project, "--out", tmp_path / "store", "--force"),
                          "holds the weights of model 'a'", "never writes over its inputs")
    assert digest(tmp_path / "store") == before
    assert run("merge", project, "--out", tmp_path / "store" / "merged").exit_code == 0  # beside is fine
    assert digest(tmp_path / "store" / "merged") and (tmp_path / "store" / "weights.safetensors").is_file()


@pytest.mark.parametrize("out", [".", ".."])
def test_force_never_replaces_the_project_folder(tmp_path, llama_family, out):
    project = linear_project(tmp_path / "proj", llama_family["ft1"], llama_family["ft2"])
    before = project.read_bytes()
    assert_one_line_error(run("merge", project, "--out", tmp_path / "proj" / out, "--force"),
                          "holds the project file", "project.toml")
    assert project.read_bytes() == before


def test_an_output_beside_the_project_file_is_normal(tmp_path, llama_family):
    project = linear_project(tmp_path / "proj", llama_family["ft1"], llama_family["ft2"])
    assert run("merge", project).exit_code == 0
    assert (tmp_path / "proj" / "out" / "merged" / "model.safetensors").is_file()
    assert run("merge", project, "--force").exit_code == 0  # replacing the output itself is fine


def _sharded_copy(source: Path, folder: Path, entry: str, shard: str) -> Path:
    shutil.copytree(source, folder)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    names = tiny_models.load_tensors(folder)
    weight_map = {name: "model-00001-of-00001.safetensors" for name in names}
    weight_map[entry] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("outside", ["relative", "absolute"])
def test_shard_names_outside_the_model_folder_are_refused(tmp_path, llama_family, outside):
    secret = tmp_path / "elsewhere" / "model.safetensors"
    secret.parent.mkdir()
    shutil.copyfile(llama_family["ft2"] / "model.safetensors", secret)
    shard = "../elsewhere/model.safetensors" if outside == "relative" else str(secret)
    entry = "model.layers.0.mlp.up_proj.weight"
    model = _sharded_copy(llama_family["ft1"], tmp_path / "m", entry, shard)
    project = linear_project(tmp_path, model, llama_family["base"], output="out")
    assert_one_line_error(run("merge", project), "m/model.safetensors.index.json", f"entry '{entry}'",
                          f"'{shard}'", "outside the model folder")
    assert not (tmp_path / "out").exists()


def test_a_shard_entry_that_is_not_a_file_name_is_one_line(tmp_path, llama_family):
    entry = "model.norm.weight"
    model = _sharded_copy(llama_family["ft1"], tmp_path / "m", entry, ["model.safetensors"])
    project = linear_project(tmp_path, model, llama_family["base"], output="out")
    assert_one_line_error(run("merge", project), f"entry '{entry}' names shard ['model.safetensors']",
                          "file names inside the model folder")


def test_a_sharded_index_inside_the_folder_still_reads(tmp_path, llama_family):
    entry = "model.layers.0.mlp.up_proj.weight"
    model = _sharded_copy(llama_family["ft1"], tmp_path / "m", entry, "./model-00001-of-00001.safetensors")
    project = linear_project(tmp_path, model, llama_family["ft1"], output="out")
    assert run("merge", project).exit_code == 0
    out, source = tiny_models.load_tensors(tmp_path / "out"), tiny_models.load_tensors(llama_family["ft1"])
    assert all(torch.allclose(out[k], source[k], atol=1e-7) for k in source)


def test_a_legacy_format_bin_is_read(tmp_path, llama_family):
    shutil.copytree(llama_family["ft1"], tmp_path / "legacy")
    (tmp_path / "legacy" / "model.safetensors").unlink()
    torch.save(tiny_models.load_tensors(llama_family["ft1"]), tmp_path / "legacy" / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    project = linear_project(tmp_path, tmp_path / "legacy", llama_family["ft2"], output="out")
    assert run("merge", project).exit_code == 0
    out = tiny_models.load_tensors(tmp_path / "out")
    a, b = tiny_models.load_tensors(llama_family["ft1"]), tiny_models.load_tensors(llama_family["ft2"])
    assert all(torch.allclose(out[k], (a[k] + b[k]) / 2, atol=1e-6) for k in a)


def test_a_read_only_output_folder_is_one_line(tmp_path, llama_family, monkeypatch):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_open, real_mkdir = os.open, os.mkdir

    def refuse(real):
        def call(path, *args, **kwargs):
            if Path(path).parent == read_only:
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real(path, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "open", refuse(real_open))
    monkeypatch.setattr(os, "mkdir", refuse(real_mkdir))
    project = linear_project(tmp_path, llama_family["ft1"], llama_family["ft2"], output="ro/out")
    assert_one_line_error(run("merge", project), f"cannot write to {read_only}", "Read-only file system")
    assert list(read_only.iterdir()) == []


@pytest.mark.parametrize("umask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_the_output_follows_the_umask(tmp_path, llama_family, umask, folder_mode, file_mode):
    project = linear_project(tmp_path, llama_family["ft1"], llama_family["ft2"], output="out")
    previous = os.umask(umask)
    try:
        assert run("merge", project).exit_code == 0
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == folder_mode
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes.values()) == {file_mode}, modes


# A real mixcli process with one extra method plugin that copies tensors slowly: a merge that
# takes long enough to be interrupted or overlapped mid-write.
SLOW = """
import os, sys, time
from pathlib import Path
import mixcli
from mixcli.plugins import pm
from mixcli.cli import main

calls = 0

def slow_copy(tensors, base=None):
    global calls
    calls += 1
    if calls > 3:
        Path(os.environ["SLOW_STARTED"]).touch()
        release = os.environ.get("SLOW_RELEASE")
        deadline = time.monotonic() + 60
        while release and not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(float(os.environ.get("SLOW_DELAY", "0")))
    return tensors[0].clone()

class SlowPlugin:
    @mixcli.hookimpl
    def register_merge_methods(register):
        register(mixcli.MergeMethod(name="slow_copy", summary="copy, slowly", merge=slow_copy,
                                    base="ignored", min_inputs=1, max_inputs=1))

pm.register(SlowPlugin, name="slow-copy")
sys.argv = ["mixcli", *sys.argv[1:]]
main()
"""


def _slow_merge(tmp_path: Path, family, workers: int, **env) -> subprocess.Popen:
    project = write_project(tmp_path, f"""
[models]
a = "{family['ft1']}"
[method]
name = "slow_copy"
[output]
path = "out"
""")
    environment = dict(os.environ, SLOW_STARTED=str(tmp_path / "started"), **env)
    return subprocess.Popen([sys.executable, "-c", SLOW, "merge", str(project), "--no-progress",
                             "--workers", str(workers)], cwd=tmp_path, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not path.exists():
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "the merge never started writing"
        time.sleep(0.02)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_during_a_write_leaves_nothing(tmp_path, llama_family, workers):
    process = _slow_merge(tmp_path, llama_family, workers, SLOW_DELAY="0.3")
    _wait_for(tmp_path / "started", process)
    scratch = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(scratch) == 1 and list(scratch[0].glob("*.safetensors")), "not mid-write"
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "Traceback" not in output and "Aborted (SIGTERM)" in output, output
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path, "out") == []


def test_two_merges_to_one_target_the_second_fails_cleanly(tmp_path, llama_family):
    release = tmp_path / "release"
    first = _slow_merge(tmp_path, llama_family, 2, SLOW_RELEASE=str(release))
    try:
        _wait_for(tmp_path / "started", first)
        second = linear_project(tmp_path / "other", llama_family["ft1"], llama_family["ft2"],
                                output=str(tmp_path / "out"))
        for extra in ([], ["--force"]):
            assert_one_line_error(run("merge", second, *extra), f"{tmp_path / 'out'} is being written by "
                                  f"another mixcli run (pid {first.pid})")
    finally:
        release.touch()
    output = first.communicate(timeout=120)[0]
    assert first.returncode == 0, output
    out, source = tiny_models.load_tensors(tmp_path / "out"), tiny_models.load_tensors(llama_family["ft1"])
    assert out.keys() == source.keys() and all(torch.equal(out[k], source[k]) for k in source)
    assert leftovers(tmp_path, "out") == []


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _leftover(folder: Path, kind: str, pid: int, token: str, marked: bool = True) -> Path:
    path = folder / f".out.{kind}-{pid}-{token}"
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"partial")
    if marked:
        (path / ".mixcli-partial").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    return path


def test_only_dead_runs_temporary_folders_are_removed(tmp_path, llama_family):
    dead = _dead_pid()
    stale = _leftover(tmp_path, "tmp", dead, "0badc0de")
    live = _leftover(tmp_path, "tmp", os.getpid(), "0000beef")
    foreign = _leftover(tmp_path, "tmp", dead, "12345678", marked=False)
    odd_name = _leftover(tmp_path, "tmp", dead, "not-ours")
    previous = _leftover(tmp_path, "old", dead, "00000001")
    project = linear_project(tmp_path, llama_family["ft1"], llama_family["ft2"], output="out")
    assert run("merge", project).exit_code == 0
    assert not stale.exists()
    assert live.exists() and foreign.exists() and odd_name.exists()
    assert previous.exists()  # a replaced output is removed only once a new one is in place
    assert run("merge", project, "--force").exit_code == 0
    assert not previous.exists()
    assert leftovers(tmp_path, "out") == sorted(p.name for p in (live, foreign, odd_name))


def test_what_a_killed_run_left_is_removed_by_the_next_merge(tmp_path, llama_family):
    process = _slow_merge(tmp_path, llama_family, 2, SLOW_DELAY="0.3")
    _wait_for(tmp_path / "started", process)
    process.kill()  # SIGKILL: no cleanup can run
    process.communicate(timeout=60)
    left = leftovers(tmp_path, "out")
    assert any(name.startswith(".out.tmp-") for name in left), left
    project = linear_project(tmp_path / "again", llama_family["ft1"], llama_family["ft2"],
                             output=str(tmp_path / "out"))
    assert run("merge", project).exit_code == 0
    assert leftovers(tmp_path, "out") == []
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_signal_during_the_final_rename_waits_until_it_is_done():
    from mixcli.target import Interrupted, SignalGuard

    before = signal.getsignal(signal.SIGTERM)
    steps = []
    with pytest.raises(Interrupted) as caught:
        with SignalGuard() as guard:
            with guard.critical():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler runs here and defers
                steps.append("renamed")
            steps.append("after")
    assert steps == ["renamed", "after"] and caught.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
