"""Letting the pages of memory-mapped inputs go (``release_pages``) while a method still uses
them: values never change, only pages of an input map wholly inside the tensor go, anything
else is left alone; karcher, sce and multislerp over mapped inputs equal the same merges over
copies, and
their memory-saving paths equal whole-tensor references written from the spec (§2.3, §2.4 of
merge-methods-more.md)."""

import sys

import pytest
import torch
from safetensors.torch import save_file

from mixcli.safetensors_io import SafetensorsFile, release_pages
from mixcli_merge import karcher, multislerp, sce
from mixcli_merge.sce import ROW_BY_ROW_ABOVE

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/smaps")


def resident_bytes(tensor) -> int:
    """Resident bytes of the mapping holding ``tensor`` (from /proc/self/smaps)."""
    address = tensor.data_ptr()
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError("no mapping holds the tensor")


def mapped(tmp_path, tensors: dict):
    """``tensors`` saved to one safetensors file and loaded back as views of its map."""
    path = tmp_path / f"m{len(list(tmp_path.iterdir()))}.safetensors"
    save_file(tensors, str(path))
    file = SafetensorsFile(path)
    return {name: file.load(file.tensors[name]) for name in tensors}


def test_release_pages_drops_an_input_tensors_pages_and_keeps_its_values(tmp_path):
    g = torch.Generator().manual_seed(0)
    # an odd-sized neighbour first: the big tensor starts inside a page it shares
    original = {"a": torch.randn(333, generator=g), "big": torch.randn(4_000_000, generator=g).to(torch.bfloat16),
                "c": torch.randn(77, generator=g)}
    views = mapped(tmp_path, original)
    big = views["big"]
    assert float(big.float().sum()) == float(original["big"].float().sum())  # every page touched
    before = resident_bytes(big)
    release_pages(big)
    after = resident_bytes(big)
    assert before - after >= 7_900_000, (before, after)  # ~8 MB of the tensor's pages went
    for name, tensor in original.items():  # values read back from the page cache, neighbours too
        assert torch.equal(views[name], tensor), name
    release_pages(big[1000:2_000_000])  # a slice: only the pages wholly inside it
    assert torch.equal(big, original["big"]) and torch.equal(views["a"], original["a"])


def test_release_pages_leaves_other_tensors_alone(tmp_path):
    views = mapped(tmp_path, {"x": torch.randn(600_000)})
    copies = [torch.randn(600_000), views["x"].clone(), torch.randn(700, 900).t()]  # t(): not contiguous
    expected = [c.clone() for c in copies]
    for tensor in copies:
        release_pages(tensor)  # in anonymous memory the pages would come back as zeros
    assert all(torch.equal(c, e) for c, e in zip(copies, expected))
    release_pages(views["x"].view(600, 1000).t())  # a non-contiguous view of the map: nothing
    release_pages(torch.empty(0))


def karcher_reference(xs, max_iter=10, tol=1e-5):
    """§2.3 with whole tensors: norms of the inputs converted whole to float32."""
    wide = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    n = len(xs)
    norms = [torch.linalg.vector_norm(x.reshape(-1).to(wide)) for x in xs]
    units = [(x / norm).to(x.dtype) for x, norm in zip(xs, norms)]
    valid = [i for i in range(n) if norms[i].item() > tol]
    betas = [(1 / n) / sum(1 / n for _ in valid)] * len(valid)
    mean = torch.zeros_like(xs[0])
    for beta, i in zip(betas, valid):
        mean += beta * units[i]
    mean = (mean / torch.linalg.vector_norm(mean.to(wide))).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for beta, i in zip(betas, valid):
            cos = torch.clamp(torch.dot(mean.reshape(-1), units[i].reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() >= tol:
                tangent += beta * (theta / torch.sin(theta)) * (units[i] - cos * mean)
        length = torch.linalg.vector_norm(tangent.to(wide))
        if length.item() < tol:
            break
        mean = (torch.cos(length) * mean + torch.sin(length) * (tangent / length)).to(mean.dtype)
        mean = (mean / torch.linalg.vector_norm(mean.to(wide))).to(mean.dtype)
    return sum((1 / n) * norm for norm in norms) * mean  # Σ α_i n_i, α_i = 1/n


def sce_reference(xs, base):
    """§2.4 without selection, on the stacked task vectors."""
    taus = torch.stack([x - base for x in xs])
    total_sign = torch.where(taus.sum(dim=0) >= 0, 1.0, -1.0).to(base.dtype)
    agree = (taus.sign() == total_sign).to(base.dtype)
    squares = taus.square().reshape(len(xs), -1).mean(dim=1)
    total = torch.sum(squares).item()
    weights = torch.ones_like(squares) / len(xs) if abs(total) < 1e-6 else squares / total
    weighted = weights.view(-1, 1, 1) * agree
    return base + (taus * weighted).sum(dim=0) / torch.sum(weighted, dim=0).clamp(min=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_karcher_and_sce_over_mapped_inputs_equal_the_whole_tensor_references(tmp_path, dtype):
    g = torch.Generator().manual_seed(1)
    shape = (263, 251)  # above ROW_BY_ROW_ABOVE entries, not a multiple of a page
    assert shape[0] * shape[1] > ROW_BY_ROW_ABOVE
    base = torch.randn(shape, generator=g) * 0.02
    models = {name: (base + torch.randn(shape, generator=g) * 0.003).to(dtype) for name in ("ft1", "ft2", "ft3")}
    views = mapped(tmp_path, {"base": base.to(dtype), **models})
    copies = {name: tensor.clone() for name, tensor in views.items()}
    xs = [views[name] for name in models]
    for threads in (1, 2):  # sce's row-by-row means must not depend on the thread count
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = torch.empty(shape, dtype=dtype)
            assert torch.equal(karcher.karcher(xs, None, out=out), karcher_reference(list(copies.values())[1:]))
            assert torch.equal(karcher.karcher(xs[:2], None, max_iter=3), karcher_reference(xs[:2], max_iter=3))
            for n in (1, 2, 3):
                want = sce_reference([copies[name] for name in list(models)[:n]], copies["base"])
                assert torch.equal(sce.sce(xs[:n], views["base"], out=torch.empty(shape, dtype=dtype)), want), n
            weights = dict(weight=[0.6, 0.4, 0.3])
            assert torch.equal(multislerp.multislerp(xs, views["base"], **weights),
                               multislerp.multislerp([copies[name] for name in models], copies["base"], **weights))
        finally:
            torch.set_num_threads(saved)
    assert all(torch.equal(views[name], copies[name]) for name in views)  # inputs untouched


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_karcher_into_a_misaligned_output_buffer_rounds_as_into_a_fresh_one(dtype):
    # the engine passes the output file's own memory, at whatever offset the tensor has in its
    # shard; torch's vectorised sums round differently over a buffer that is not aligned
    g = torch.Generator().manual_seed(3)
    shape = (300, 257)
    xs = [(torch.randn(shape, generator=g) * 0.02).to(dtype) for _ in range(3)]
    want = karcher_reference(xs)
    size = torch.tensor([], dtype=dtype).element_size()
    for offset in (1, 2, 5, 10):  # elements: 2 to 40 bytes off a 64-byte boundary
        backing = torch.empty(shape[0] * shape[1] + 64, dtype=dtype)
        start = (-backing.data_ptr() // size) % (64 // size) + offset
        out = backing[start:start + shape[0] * shape[1]].view(shape)
        assert out.data_ptr() % 64 != 0
        assert torch.equal(karcher.karcher(xs, None, out=out), want), offset
        assert torch.equal(out, want)
        misaligned = [backing.clone()[start:start + x.numel()].copy_(x.reshape(-1)).view(shape) for x in xs]
        assert torch.equal(karcher.karcher(misaligned, None), want), offset  # inputs at odd offsets too



@pytest.mark.parametrize("method", ["tsv_merge", "iso_cts"])
def test_singular_merges_let_their_mapped_inputs_go_with_the_bits_of_copies(method, tmp_path):
    # the mean path (an embedding) drops each chunk's pages once used, the SVD rule the task
    # models' pages once its float32 task vectors hold them: the resident inputs of a large
    # embedding (3 x 125 MiB at 0.85 B) were what put the merge over 1 GB
    from mixcli_merge import iso_cts, tsv_merge

    merge = {"tsv_merge": tsv_merge.tsv_merge, "iso_cts": iso_cts.iso_cts}[method]
    g = torch.Generator().manual_seed(5)
    base = torch.randn(200, 3000, generator=g).to(torch.bfloat16)  # more elements than a chunk
    models = [base] + [(base.float() + 0.01 * torch.randn(base.shape, generator=g)).bfloat16() for _ in range(3)]
    views = [mapped(tmp_path, {"t": tensor})["t"] for tensor in models]  # one file each
    for decompose in (False, True):
        for view in views:
            assert float(view.float().sum()) == float(view.float().sum())  # every page mapped in
        got = merge(views[1:], views[0], decompose=decompose, name="t")
        want = merge([m.clone() for m in models[1:]], models[0].clone(), decompose=decompose)
        assert torch.equal(got, want), decompose
        # 1.2 MB each went; a page at a chunk's edge may stay; the SVD rule's finish reads the base
        for view in views if not decompose else views[1:]:
            assert resident_bytes(view) < 0.05 * base.numel() * 2, decompose


def test_return_free_memory_gives_freed_arena_blocks_back():
    # blocks under glibc's mmap threshold stay in the freeing thread's arena after free();
    # the engine returns them before a linear-algebra tensor's large working set
    import subprocess

    code = """
import threading, time, mixcli.engine as engine
def anon():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon'))
churned, done = threading.Event(), threading.Event()
def churn():  # a worker thread: its own arena; it stays alive, holding the arena's top block
    import torch
    block = torch.ones(6 * 2**20)
    del block  # a freed 24 MiB block lifts glibc's mmap threshold above 4 MiB
    keep = [torch.ones(2**20) for _ in range(100)]  # 4 MiB each, in the arena, every page touched
    del keep[:-1]
    churned.set()
    done.wait()
thread = threading.Thread(target=churn); thread.start(); churned.wait()
time.sleep(0.2)
before = anon()
if "trim" in __import__("sys").argv:
    engine.return_free_memory()
print(before - anon())
done.set(); thread.join()
"""

    def freed_kib(*args):
        return int(subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                                  check=True).stdout)

    assert freed_kib() < 50 * 1024  # left alone, the arena keeps them
    assert freed_kib("trim") > 250 * 1024  # most of the ~400 MiB freed went back
