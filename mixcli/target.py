"""The output folder's safety: what may be replaced, one writer per target, temporary folders
that are recognisably mixcli's own, and SIGTERM handled like Ctrl-C."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import signal
import socket
import threading
from pathlib import Path
from typing import Mapping

from .errors import MixcliError

# in every temporary folder mixcli makes, until the moment it is renamed into place
MARKER = ".mixcli-partial"


def check_target(target: Path, force: bool, protected: Mapping[str, Path] | None = None,
                 project_file: Path | None = None) -> None:
    """Refuse an output that would destroy something the user did not name as the output:
    an input model's folder (the output is it, holds it or lies inside it) or the folder
    holding the project file (the output is it or holds it), ``--force`` or not; and an
    existing output without ``--force``."""
    real = Path(os.path.realpath(target))
    for label, folder in (protected or {}).items():
        folder = Path(os.path.realpath(folder))
        inside = real.is_relative_to(folder) and not folder.is_file()
        if real == folder or inside or folder.is_relative_to(real):
            how = ("is" if real == folder else "lies inside" if real.is_relative_to(folder) else "holds")
            raise MixcliError(f"{target} {how} {label} ({folder}); mixcli never writes "
                              "over its inputs, --force or not: choose another output path")
    if project_file is not None:
        home = Path(os.path.realpath(project_file))
        if home.is_relative_to(real):
            raise MixcliError(f"{target} holds the project file {project_file}; mixcli never replaces "
                              "it, --force or not: choose another output path (e.g. a subfolder)")
    if target.exists() and not force:
        raise MixcliError(f"{target} already exists; pass --force to replace it, or choose another "
                          "output path (--out or [output] path)")
    if target.exists() and not target.is_dir():
        raise MixcliError(f"{target} exists and is not a folder; remove it or choose another output path")


def protected_folders(project, models: Mapping | None = None) -> dict[str, Path]:
    """What a merge of ``project`` reads, by a label for messages: the local model and LoRA
    adapter folders, and once the models are open, where each really lives (a Hub download's
    snapshot) and the weight files it links to elsewhere (the Hub cache's blobs, a user's own links: an
    output may lie beside those, not over them)."""
    folders = {f"the folder of model '{name}'": ref.resolved_path for name, ref in project.models.items()
               if ref.resolved_path.is_dir()}
    for name, ref in project.models.items():  # a LoRA adapter is an input too
        adapter = ref.project_dir / Path(ref.lora).expanduser() if ref.lora else None
        if adapter is not None and adapter.is_dir():
            folders[f"the adapter folder of model '{name}'"] = adapter
    for name, ckpt in (models or {}).items():
        folders[f"the folder of model '{name}'"] = Path(ckpt.path)
        home = Path(os.path.realpath(ckpt.path))
        files = {info.file.path for info in ckpt.tensors.values() if hasattr(info.file, "path")}
        files = {Path(os.path.realpath(f)) for f in files}
        for i, file in enumerate(sorted(f for f in files if not f.is_relative_to(home))):
            folders[f"the weights of model '{name}'{f' #{i + 1}' if i else ''}"] = file
        if ckpt.extra.get("lora"):
            folders[f"the adapter folder of model '{name}'"] = Path(ckpt.extra["lora"])
    return folders


def unwritable(folder: Path, error: OSError) -> MixcliError:
    return MixcliError(f"cannot write to {folder} ({error.strerror}); choose another output path")


@contextlib.contextmanager
def target_lock(target: Path):
    """Hold an exclusive lock on ``target`` (a lock file beside it) for the duration; a second
    writer of the same target fails at once, naming it."""
    path = target.parent / f".{target.name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise unwritable(target.parent, error) from None
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise MixcliError(f"{target} is being written by another mixcli run (pid {holder}); wait "
                              "for it to finish or choose another output path") from None
        except OSError:
            break  # a file system without locks: write unlocked, as before
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file we locked: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _leftover_pattern(target: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(\d+)-[0-9a-f]+$")


def make_scratch(target: Path, kind: str = "tmp") -> Path:
    """A new empty folder ``.{name}.{kind}-{pid}-{token}`` beside ``target``, marked as mixcli's.
    Created with mode 0777 so the user's umask applies, as for any folder they make."""
    for _ in range(100):
        path = target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        except OSError as error:
            raise unwritable(target.parent, error) from None
        try:
            (path / MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
        except OSError as error:
            shutil.rmtree(path, ignore_errors=True)
            raise unwritable(target.parent, error) from None
        return path
    raise MixcliError(f"cannot make a temporary folder beside {target}")


def publish(scratch: Path, target: Path, signals: "SignalGuard") -> None:
    """Put the finished ``scratch`` folder in place of ``target`` as one step that signals wait
    for: unmarked, and renamed over; an existing target is first moved into a marked folder, so a
    run killed right then is cleaned up by the next one."""
    with signals.critical():
        (scratch / MARKER).unlink()
        if target.exists():
            old = make_scratch(target, "old")
            os.replace(target, old / "previous")
            os.replace(scratch, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(scratch, target)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(target: Path) -> list[Path]:
    """Remove the temporary folders that earlier, killed runs left beside ``target``: only
    folders named like mixcli's, holding its marker, made on this host by a process that no
    longer exists. A replaced output (``.old-``) goes only once the new one is in place.
    Called with the target's lock held, so no live run of this target owns any of them."""
    pattern = _leftover_pattern(target)
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            mark = json.loads((entry / MARKER).read_text())
            pid, host = int(mark["pid"]), mark["host"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not (or no longer provably) ours
        if host != socket.gethostname() or pid != int(match.group(2)) or _alive(pid):
            continue
        if match.group(1) == "old" and not target.is_dir():
            continue  # holds the previous output and the new one never landed: leave it
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while an output was being written."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class SignalGuard:
    """While active (main thread only), SIGINT and SIGTERM raise :class:`Interrupted`, once:
    later signals wait until the cleanup is done. Inside :meth:`critical` they wait too."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.pending: int | None = None
        self._raised = False
        self._critical = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self._raised or self._critical:
            self.pending = self.pending or signum
            return
        self._raised = True
        raise Interrupted(signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup'd: keep ignoring
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if exc[0] is None and self.pending is not None:
            raise Interrupted(self.pending)  # arrived during the final rename: the output is complete

    @contextlib.contextmanager
    def critical(self):
        self._critical = True
        try:
            yield
        finally:
            self._critical = False


def is_no_space(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, errno.EDQUOT)
