"""The streaming engine: computes a plan's tensors on all cores and writes them straight to
sharded safetensors in a temporary folder beside the target, renamed into place at the end
(the target's safety, its lock and signals: :mod:`mixcli.target`)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from . import __version__
from .errors import MixcliError
from .plan import OutputPlan, all_finite, nonfinite_message
from .safetensors_io import ShardedWriter
from .target import (SignalGuard, check_target, is_no_space, make_scratch, publish, remove_leftovers,
                     target_lock, unwritable)

__all__ = ["check_target", "write_plan", "run_plan", "merge_threads", "default_workers", "require_device"]

DONOR_FILES = ("generation_config.json",)
SPACE_MARGIN = 16 * 2**20
_threads_before_write: int | None = None  # torch's thread count before write_plan set one per worker


def require_device(device: str, where: str) -> None:
    """Fail in one line, before anything is read, when ``device`` is not there."""
    if device == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        build = "" if torch.version.cuda else ", a build without CUDA"
        raise MixcliError(f"{where}: device '{device}' asked, but torch {torch.__version__}{build} finds no "
                          "CUDA device; use \"cpu\" or run where a GPU is visible")
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise MixcliError(f"{where}: device '{device}' asked, but only {torch.cuda.device_count()} CUDA "
                          f"device(s) are visible (cuda:0..cuda:{torch.cuda.device_count() - 1})")


def _check_space(folder: Path, needed: int, target: Path) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed + SPACE_MARGIN:
        raise MixcliError(f"no space left on the device for {target}: the output needs "
                          f"{needed / 1e9:.2f} GB and {free / 1e9:.2f} GB are free; free some space or "
                          "choose another output path")


def default_workers() -> int:
    # one more thread than cores: while one waits on a page fault or a write, the others compute
    return max(2, min(8, (os.cpu_count() or 1) + 1))


MEMORY_BUDGET = 640 * 2**20  # working memory shared by the tensors in flight


def working_bytes(tensor) -> int:
    """A generous estimate of what computing one output tensor holds at once: its mapped
    inputs, float32 temporaries the size of two inputs, and the result."""
    if tensor.work_bytes is not None:
        return tensor.input_bytes + tensor.work_bytes
    return tensor.input_bytes + 3 * tensor.nbytes + 8 * (tensor.nbytes // max(1, _item(tensor.dtype)))


def _item(code: str) -> int:
    from .safetensors_io import ITEM_SIZE

    return ITEM_SIZE[code]


class _Budget:
    """Admits tensors while their working memory fits; one too large for the budget runs alone."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.condition = threading.Condition()

    def acquire(self, cost: int) -> int:
        cost = min(cost, self.limit)
        with self.condition:
            self.condition.wait_for(lambda: self.used + cost <= self.limit)
            self.used += cost
        return cost

    def release(self, cost: int) -> None:
        with self.condition:
            self.used -= cost
            self.condition.notify_all()


def write_plan(plan: OutputPlan | dict[str, OutputPlan], target: Path, *, force: bool = False,
               shard_size: int = 2 * 10**9, card: str = "", recipe: str = "", copy_tokenizer: bool = True,
               workers: int | None = None, progress: bool = True, protected: dict[str, Path] | None = None,
               project_file: Path | None = None) -> Path:
    """Write ``plan`` to ``target`` atomically; return ``target``.

    A dict of plans (a method with several output models) writes each into the subfolder
    named by its key; the whole set appears at once or not at all. ``protected`` (label to
    folder: the inputs) and ``project_file`` are never written over, ``force`` or not.
    """
    target = Path(target).absolute()
    check_target(target, force, protected, project_file)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise MixcliError(f"cannot create the output folder {parent} ({error.strerror})") from None
    plans = plan if isinstance(plan, dict) else {"": plan}
    with SignalGuard() as signals, target_lock(target):
        check_target(target, force, protected, project_file)  # again, now that no one else writes it
        remove_leftovers(target)
        _check_space(parent, sum(p.output_bytes for p in plans.values()), target)
        _write(plans, target, signals, shard_size, card, recipe, copy_tokenizer,
               workers or default_workers(), progress)
    return target


def _write(plans: dict[str, OutputPlan], target: Path, signals: SignalGuard, shard_size: int, card: str,
           recipe: str, copy_tokenizer: bool, workers: int, progress: bool) -> None:
    scratch = make_scratch(target)
    writers: list[ShardedWriter] = []
    warmer = None
    try:
        for name, one in plans.items():
            folder = scratch / name
            folder.mkdir(exist_ok=True)
            writers.append(ShardedWriter(folder, [(t.name, t.dtype, t.shape) for t in one.tensors],
                                         shard_size, metadata={"mixcli_version": __version__}))
        # importing torch keeps one core busy for seconds: meanwhile another prepares the
        # output's page cache, which the merge would otherwise do in its page faults
        warmer = _Warmer(writers[0])
        with merge_threads(workers):
            for (name, one), writer in zip(plans.items(), writers):
                run_plan(one, writer, workers, progress)
                warmer.stop()
                writer.close()
                _write_files(one, scratch / name, card, recipe, copy_tokenizer)
                if one.finalize is not None:
                    one.finalize(scratch / name)
        publish(scratch, target, signals)
    except OSError as error:
        _discard(warmer, writers, scratch)
        if is_no_space(error):
            raise MixcliError(f"no space left on the device while writing {target}; nothing was "
                              "written: free some space or choose another output path") from None
        where = f" ({error.filename})" if error.filename else ""
        raise MixcliError(f"cannot write {target}: {error.strerror or error}{where}; nothing was "
                          "written") from None
    except BaseException:
        _discard(warmer, writers, scratch)
        raise


@contextmanager
def merge_threads(workers: int):
    """Around computing a plan's tensors: one torch thread per worker (elementwise merges scale
    better across tensors than inside one), and the garbage collector spared from rescanning
    what lives to the end. The in-memory build (:mod:`mixcli.inmemory`) computes under the
    same settings, so both give the same bits."""
    import torch

    global _threads_before_write
    threads = _threads_before_write = torch.get_num_threads()
    torch.set_num_threads(1 if workers > 1 else threads)
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)
        _threads_before_write = None


@contextmanager
def all_cores():
    """Inside a plan's ``compute`` or ``finalize``: torch uses every core again (the thread
    count from before the write) for work that spans the whole model, such as training
    routers or forward passes, instead of the one thread per worker of elementwise merges."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(_threads_before_write or saved)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


WARM_AHEAD = 2 * 2**30  # bytes of output page cache prepared ahead, at most


class _Warmer:
    """Reads, from a background thread, the first WARM_AHEAD bytes of the output. The blocks
    are allocated but unwritten, so this reads no disk: it fills the page cache with zeroed
    pages, which the tensors are then written into without faulting new memory in. Bounded,
    so that a large output cannot push the inputs out of the cache."""

    def __init__(self, writer: ShardedWriter):
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=writer.warm, args=(WARM_AHEAD, self._stopping),
                                        name="mixcli-warm", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()


def _discard(warmer, writers: list[ShardedWriter], scratch: Path) -> None:
    if warmer is not None:
        warmer.stop()
    for writer in writers:
        try:
            writer.close()
        except OSError:
            pass
    shutil.rmtree(scratch, ignore_errors=True)


def run_plan(plan: OutputPlan, writer, workers: int, progress: bool) -> None:
    """Compute every tensor of ``plan`` into ``writer``, a few at a time within the memory budget.

    ``writer`` is a :class:`mixcli.safetensors_io.ShardedWriter` or anything with its
    ``mapped(name)``, ``destination(name)`` and ``write(name, tensor)`` (the in-memory build's);
    call it inside :func:`merge_threads`."""
    from .progress import progress as progress_bar

    total = sum(t.input_bytes for t in plan.tensors) or 1
    lock = threading.Lock()

    budget = _Budget(MEMORY_BUDGET)

    def work(tensor):
        # large linear algebra runs alone (the whole budget) with every core
        cost = budget.acquire(budget.limit if tensor.intra_op else working_bytes(tensor))
        cores = _all_cores() if tensor.intra_op else contextlib.nullcontext()
        if tensor.intra_op:
            return_free_memory()  # what earlier tensors freed, before this one's large working set
        try:
            if tensor.fill is not None and writer.mapped(tensor.name):
                with writer.destination(tensor.name) as target:
                    with cores:  # into the output file or not, the same threads
                        tensor.fill(target)
                    _check_output(tensor, target, plan.warnings)
                    del target
            else:
                with cores:
                    result = tensor.compute()
                _check_output(tensor, result, plan.warnings)
                writer.write(tensor.name, result)
                del result
            for ckpt, name in tensor.reads:
                ckpt.release(name)
        finally:
            budget.release(cost)
        return tensor

    # the bar counts input bytes read (what the time goes into); the tensor count is in its name
    with progress_bar("merging", total, unit="bytes", enabled=progress) as bar:
        done = 0

        def advance(tensor):
            nonlocal done
            with lock:
                done += 1
                bar.advance(tensor.input_bytes or 1, description=f"merging {done}/{len(plan.tensors)} tensors")

        if workers == 1:
            for tensor in plan.tensors:
                advance(work(tensor))
            return
        with ThreadPoolExecutor(workers) as pool:
            pending = deque()
            try:
                for tensor in plan.tensors:
                    pending.append(pool.submit(work, tensor))
                    # bounded look-ahead keeps memory at a few tensors, not the model
                    while len(pending) > workers:
                        advance(pending.popleft().result())
                while pending:
                    advance(pending.popleft().result())
            except BaseException:
                for future in pending:
                    future.cancel()
                raise


def _check_output(tensor, result, warnings) -> None:
    """NaN or Inf in an output whose compute did not check its inputs (upscalers, MoE and
    adapted models): a warning naming the input that holds them (an error with --strict)."""
    if getattr(tensor.compute, "checks_finite", False) or not result.is_floating_point() or all_finite(result):
        return
    for ckpt, name in tensor.reads:
        value = ckpt.tensor(name)
        if value.is_floating_point() and not all_finite(value):
            warnings.add(nonfinite_message(ckpt, name))
            return
    warnings.add(f"output tensor '{tensor.name}' holds NaN or Inf values although its inputs do not")


_LIBC = None


def return_free_memory() -> None:
    """Give the memory the allocator holds freed back to the system (glibc's ``malloc_trim``;
    elsewhere nothing). Freed blocks below glibc's mmap threshold (which rises to 32 MiB as
    large blocks are freed) stay in the arena of the thread that freed them, and every worker
    and OpenMP thread has its own: after a few SVDs they held hundreds of MiB that no tensor
    used, on top of the next SVD's working set."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


@contextlib.contextmanager
def _all_cores():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _write_files(plan: OutputPlan, folder: Path, card: str, recipe: str, copy_tokenizer: bool) -> None:
    (folder / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
    donor = plan.donor
    if donor is not None:
        for name in DONOR_FILES:
            if (donor.path / name).is_file():
                shutil.copyfile(donor.path / name, folder / name)
        if copy_tokenizer and not plan.own_tokenizer:
            for path in donor.tokenizer_files():
                shutil.copyfile(path, folder / path.name)
    for name, content in plan.extra_files.items():
        (folder / name).write_bytes(content)
    if recipe:
        (folder / "mixcli.toml").write_text(recipe)
    if card:
        (folder / "README.md").write_text(card)
