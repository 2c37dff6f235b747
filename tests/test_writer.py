"""The sharded safetensors writer: tensors written through shared memory maps (blocks
allocated ahead) and with pwrite (file systems that cannot allocate ahead) give the very
same files, which stock safetensors reads back."""

import errno
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from mixcli.safetensors_io import ShardedWriter, dtype_code


def sample_tensors():
    generator = torch.Generator().manual_seed(0)
    # odd sizes put most tensors at offsets that are not page aligned
    return {
        "a.weight": torch.randn(33, 71, generator=generator).to(torch.bfloat16),
        "b.weight": torch.randn(1000, 37, generator=generator),
        "c.bias": torch.randn(5, generator=generator).to(torch.float16),
        "d.ids": torch.arange(17, dtype=torch.int64),
        "e.mask": torch.rand(9, generator=generator) > 0.5,
        "f.empty": torch.zeros(0, 4),
        "g.scalar": torch.tensor(2.5),
        "h.weight": torch.randn(3000, 3, generator=generator).to(torch.float64),
    }


def write_all(folder, tensors, use_destination):
    writer = ShardedWriter(folder, [(n, dtype_code(t.dtype), tuple(t.shape)) for n, t in tensors.items()],
                           shard_size=20_000)
    names = list(tensors)
    random.Random(0).shuffle(names)  # any order, from two threads at once

    def put(name):
        if use_destination:
            with writer.destination(name) as target:
                target.copy_(tensors[name])
                del target
        else:
            writer.write(name, tensors[name])

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(put, names))
    mapped = {name: writer.mapped(name) for name in tensors}
    writer.close()
    return mapped


def read_folder(folder):
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def cannot_allocate(monkeypatch):
    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)


@pytest.mark.parametrize("use_destination", [False, True])
def test_mapped_and_pwrite_shards_are_byte_identical(tmp_path, monkeypatch, use_destination):
    tensors = sample_tensors()
    (tmp_path / "mapped").mkdir()
    mapped = write_all(tmp_path / "mapped", tensors, use_destination)
    assert mapped == {name: t.numel() > 0 for name, t in tensors.items()}
    cannot_allocate(monkeypatch)
    (tmp_path / "plain").mkdir()
    assert not any(write_all(tmp_path / "plain", tensors, use_destination).values())
    files = sorted(p.name for p in (tmp_path / "mapped").iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) > 1  # several shards
    assert files == sorted(p.name for p in (tmp_path / "plain").iterdir())
    for name in files:
        assert (tmp_path / "mapped" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
    loaded = read_folder(tmp_path / "mapped")
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_a_view_kept_past_the_block_leaves_a_correct_file(tmp_path):
    writer = ShardedWriter(tmp_path, [("w", "F32", (4, 1024))], shard_size=10**9)
    with writer.destination("w") as target:
        target.fill_(1.5)
        kept = target[0]  # the map cannot close yet; it closes once the view is freed
    del target
    assert float(kept.sum()) == 1.5 * 1024
    del kept
    writer.close()
    assert torch.equal(load_file(tmp_path / "model.safetensors")["w"], torch.full((4, 1024), 1.5))


def test_wrong_size_is_refused(tmp_path):
    writer = ShardedWriter(tmp_path, [("w", "F32", (2, 3))], shard_size=10**9)
    with pytest.raises(RuntimeError, match="tensor 'w' has 20 bytes, 24 were planned"):
        writer.write("w", torch.zeros(5))
    writer.close()


def record_reads(monkeypatch):
    reads = []
    real = os.preadv

    def recording(fd, buffers, offset):
        reads.append((fd, offset, sum(len(b) for b in buffers)))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", recording)
    return reads


def test_warming_reads_the_allocated_data_in_file_order_up_to_the_limit(tmp_path, monkeypatch):
    layout = [(f"t{i}", "F32", (1000, 1000)) for i in range(3)]  # 4 MB each, one shard
    writer = ShardedWriter(tmp_path, layout, shard_size=10**9)
    reads = record_reads(monkeypatch)
    writer.warm(5 * 2**20, threading.Event())
    begin = (tmp_path / "model.safetensors").stat().st_size - 12_000_000  # the data section
    assert [offset for _, offset, _ in reads] == [begin + i * 2**20 for i in range(5)]
    stopped = threading.Event()
    stopped.set()
    reads.clear()
    writer.warm(2**30, stopped)
    assert reads == []
    writer.close()


def test_nothing_is_warmed_where_blocks_cannot_be_allocated(tmp_path, monkeypatch):
    cannot_allocate(monkeypatch)
    writer = ShardedWriter(tmp_path, [("w", "F32", (1000, 1000))], shard_size=10**9)
    reads = record_reads(monkeypatch)
    writer.warm(2**30, threading.Event())
    assert reads == [] and not writer.mapped("w")
    writer.close()


def test_all_cores_restores_the_thread_count_from_before_the_write(tmp_path):
    from mixcli.engine import all_cores, write_plan
    from mixcli.plan import OutputPlan, OutputTensor

    seen = {}

    def compute():
        seen["compute"] = torch.get_num_threads()
        with all_cores():
            seen["compute, all cores"] = torch.get_num_threads()
        return torch.ones(4)

    def finalize(folder):
        with all_cores():
            seen["finalize, all cores"] = torch.get_num_threads()
        seen["finalize"] = torch.get_num_threads()

    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        plan = OutputPlan(config={}, tensors=[OutputTensor("x", (4,), "F32", compute)], finalize=finalize)
        write_plan(plan, tmp_path / "out", workers=2, progress=False)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    assert seen == {"compute": 1, "compute, all cores": 3, "finalize, all cores": 3, "finalize": 1} and after == 3
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["x"], torch.ones(4))
