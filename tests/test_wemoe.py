"""Weight-ensembling MoE (mixcli-wemoe) on tiny seeded ViTs built here: a base and two experts
fine-tuned (MLPs only) against fixed random heads on synthetic 8x8 tasks. Through the CLI,
real models, no mocks."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import write_project
from mixcli.cli import cli
from mixcli.plugins import register_architectures


TASKS = 2


def vit_config():
    return transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)


def task_data(t, n, gen):
    protos = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(100 + t))
    y = torch.randint(0, 3, (n,), generator=gen)
    signature = torch.zeros(1, 1, 8, 8)
    signature[..., 4 * t:4 * t + 2, :] = 2.0  # tells the tasks apart
    return protos[y] + signature + 0.5 * torch.randn(n, 1, 8, 8, generator=gen), y


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    base = transformers.ViTModel(vit_config()).eval()
    base.save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(1)
    for t in range(TASKS):
        x, y = task_data(t, 192, gen)
        head = torch.nn.Linear(16, 3)
        torch.nn.init.normal_(head.weight, std=1.0)
        model = transformers.ViTModel(vit_config())
        model.load_state_dict(base.state_dict())
        params = [p for n, p in model.named_parameters() if ".mlp." in n]
        for p in model.parameters():
            p.requires_grad_(p in set(params))
        opt = torch.optim.Adam(params, lr=1e-2)
        for _ in range(120):
            i = torch.randint(0, 128, (32,), generator=gen)
            loss = F.cross_entropy(head(model(pixel_values=x[i]).pooler_output), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        folder = root / f"t{t}"
        model.eval().save_pretrained(folder)
        save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
                  str(folder / "head.safetensors"))
        (folder / "data").mkdir()
        save_file({"pixel_values": x[128:].contiguous(), "labels": y[128:].contiguous()}, str(folder / "data/test.safetensors"))
        save_file({"pixel_values": x[:128].contiguous(), "labels": y[:128].contiguous()}, str(folder / "data/train.safetensors"))
        (folder / "task.json").write_text(json.dumps({"task": f"t{t}", "data": {"train": "data/train.safetensors",
                                                                               "test": "data/test.safetensors"}}))
    torch.set_num_threads(threads)
    return root


def project(folder, family, method="we_moe", extra="", adapt=None, out="out", name="project.toml"):
    models = "\n".join(f't{t} = "{family / f"t{t}"}"' for t in range(TASKS))
    text = f'[models]\nbase = "{family / "base"}"\n{models}\n\n[method]\nname = "{method}"\nbase = "base"\n{extra}\n'
    if adapt is not None:
        text += f"\n[adapt]\n{adapt}\n"
    return write_project(folder, text + f'\n[output]\npath = "{out}"\n', name)


def run(*args, code=0):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def fails(args, message):
    result = run(*args, code=1)
    assert result.output.strip() == f"Error: {message}", result.output


def auto(folder):
    register_architectures()
    return transformers.AutoModel.from_pretrained(folder).eval()


def inputs(n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([task_data(t % TASKS, 1, gen)[0] for t in range(n)])


def task_arithmetic(family, lam):
    return task_arithmetic_of([family / f"t{t}" for t in range(TASKS)], family, lam)


def task_arithmetic_of(folders, family, lam):
    base = transformers.ViTModel.from_pretrained(family / "base").eval()
    experts = [transformers.ViTModel.from_pretrained(f).state_dict() for f in folders]
    state = {k: v + lam * sum(e[k] - v for e in experts) for k, v in base.state_dict().items()}
    base.load_state_dict(state)
    return base


def test_init_equals_task_arithmetic(family, tmp_path):
    run("merge", project(tmp_path, family, extra="router_std = 0.0", out="exact"))
    run("merge", project(tmp_path, family, name="p2.toml", out="random"))
    x = inputs()
    with torch.no_grad():
        reference = task_arithmetic(family, 0.3)(pixel_values=x).pooler_output
        exact = auto(tmp_path / "exact")(pixel_values=x).pooler_output
        random = auto(tmp_path / "random")(pixel_values=x).pooler_output
    assert torch.allclose(exact, reference, atol=1e-6)
    assert (random - reference).abs().max() < 1e-2  # routers start near λ
    config = json.loads((tmp_path / "random/config.json").read_text())
    assert config["model_type"] == "mixcli_wemoe" and len(config["blocks"]) == 2
    assert set(config["mixcli"]["inputs"]) == {"base", "t0", "t1"}


def test_upscale_attn_routes_attention_task_vectors(family, tmp_path):
    # Experts that changed every attention and MLP Linear: with attention upscaled too, routing
    # one-hot onto expert t reproduces expert t exactly; MLP-only upscaling cannot.
    base = transformers.ViTModel.from_pretrained(family / "base").eval()
    gen = torch.Generator().manual_seed(7)
    for t in range(TASKS):
        state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) if k.endswith("weight") and v.dim() == 2
                 and "embeddings" not in k and "pooler" not in k else v for k, v in base.state_dict().items()}
        expert = transformers.ViTModel(vit_config()).eval()
        expert.load_state_dict(state)
        expert.save_pretrained(tmp_path / f"e{t}")
    models = "\n".join(f't{t} = "{tmp_path / f"e{t}"}"' for t in range(TASKS))

    def merged(out, extra):
        text = f'[models]\nbase = "{family / "base"}"\n{models}\n\n[method]\nname = "we_moe"\nbase = "base"\n' \
               f'router_std = 0.0\n{extra}\n[output]\npath = "{out}"\n'
        run("merge", write_project(tmp_path, text, f"{out}.toml"))
        return auto(tmp_path / out)

    both, mlp_only = merged("both", "upscale_attn = true"), merged("mlp", "")
    kinds = [b["kind"] for b in json.loads((tmp_path / "both/config.json").read_text())["blocks"]]
    assert sorted(kinds) == ["attention", "attention", "mlp", "mlp"]
    x = inputs()
    with torch.no_grad():
        assert torch.allclose(both(pixel_values=x).pooler_output,
                              task_arithmetic_of([tmp_path / f"e{t}" for t in range(TASKS)], family, 0.3)(
                                  pixel_values=x).pooler_output, atol=1e-5)
        for t in range(TASKS):
            one_hot = F.one_hot(torch.tensor(t), TASKS).float()
            expert = transformers.ViTModel.from_pretrained(tmp_path / f"e{t}").eval()(pixel_values=x).pooler_output
            with both.forced_routing(one_hot):
                assert torch.allclose(both(pixel_values=x).pooler_output, expert, atol=1e-5)
            with mlp_only.forced_routing(one_hot):
                assert not torch.allclose(mlp_only(pixel_values=x).pooler_output, expert, atol=1e-3)


def test_per_sample_routing_and_save_load(family, tmp_path):
    copy = tmp_path / "family"
    shutil.copytree(family, copy)
    run("merge", project(tmp_path, copy))
    shutil.rmtree(copy)  # the saved model runs without its source models
    model = auto(tmp_path / "out")
    assert type(model).__name__ == "WEMoEModel" and not model.routing.batch_reduce
    with torch.no_grad():
        for router in model.routers:  # routers that really depend on the input
            router.fc1.weight.normal_(0, 0.5)
            router.fc2.weight.normal_(0, 0.5)
    x = inputs(4)
    with torch.no_grad():
        batch = model(pixel_values=x).last_hidden_state
        single = torch.cat([model(pixel_values=x[i:i + 1]).last_hidden_state for i in range(4)])
        with model.recording() as record:
            model(pixel_values=x)
        model.set_batch_reduce(True)
        reduced = model(pixel_values=x).last_hidden_state
        model.set_batch_reduce(False)
        explicit = model.merge_and_unload(record[0][1][2])  # sample 2's coefficients, explicitly merged
    assert torch.allclose(batch, single, atol=1e-5)  # a sample's output ignores the rest of the batch
    assert not torch.allclose(batch, reduced, atol=1e-3)  # per-sample routing differs from batch routing
    assert record[0][1].shape == (4, TASKS)
    layer0 = model.backbone.layers[0]
    with torch.no_grad():
        h = layer0.layernorm_after(torch.randn(1, 5, 16))
        model.routing.forced = record[0][1][2]
        routed = layer0.mlp(h)
        model.routing.forced = None
        plain = explicit.layers[0].mlp(h)
    assert torch.allclose(routed, plain, rtol=1e-5, atol=1e-6)
    # save -> load round trip: same tensors, same outputs, loads through AutoModel
    model.save_pretrained(tmp_path / "again")
    again = auto(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(again(pixel_values=x).last_hidden_state, batch)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    assert not list((tmp_path / "again").glob("*.bin")) and not list((tmp_path / "again").glob("*.pt"))


def test_tta_lowers_entropy_raises_accuracy(family, tmp_path):
    run("merge", project(tmp_path, family, out="plain", name="plain.toml"))
    settings = "max_steps = 60\nlr = 1e-3\ntask_id_weight = 1.0"
    result = run("adapt", project(tmp_path, family, adapt=settings))
    assert "routing per task" in result.output and "oracle routing" in result.output
    out = tmp_path / "out"
    history = json.loads((out / "adapt_log.json").read_text())
    assert history["loss"][-1] < history["loss"][0]
    record = json.loads((out / "config.json").read_text())["mixcli"]["adapt"]
    before, after = record["accuracy_before"], record["accuracy"]
    assert sum(after.values()) > sum(before.values()) + 0.1, (before, after)
    assert record["data"]["t0"]["split"] == "test" and record["collapse"] is None
    assert (out / "adapt_loss.png").stat().st_size > 1000
    card = (out / "README.md").read_text()  # the core's model card, saying what adapt did
    assert card.startswith("---\nlibrary_name: transformers") and "# out\n" in card
    assert "trained by `mixcli adapt`" in card and "max_steps = 60" in card
    assert "[adapt]" in (out / "mixcli.toml").read_text()
    old, new = load_file(tmp_path / "plain/model.safetensors"), load_file(out / "model.safetensors")
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed and all(k.startswith("routers.") for k in changed)  # only routers train


def test_ddp_two_processes_equal_one(family, tmp_path):
    settings = "max_steps = 3\nlr = 1e-3\nbatch_size = 8\nbatch_reduce = false"
    path = project(tmp_path, family, adapt=settings, out="one")
    run("adapt", path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", "-m", "mixcli", "adapt", str(path), "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = load_file(tmp_path / "one/model.safetensors"), load_file(tmp_path / "two/model.safetensors")
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-6), key


def test_pwe_batch_not_divisible_by_processes_fails(family, tmp_path):
    # PWE-MoE's training shares TTA's split of the global batch: 3 samples cannot go to 2 processes
    path = project(tmp_path, family, "pwe_moe", adapt="max_steps = 1\nbatch_size = 3")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", "-m", "mixcli", "adapt", str(path), "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode != 0
    assert ("Error: project.toml: [adapt]: batch_size 3 is not divisible by the 2 processes; set it to a multiple of 2"
            in done.stdout + done.stderr), done.stderr[-2000:]
    assert not (tmp_path / "two").exists()


def test_sparse_pruning_fraction_and_shared_router(family, tmp_path):
    run("merge", project(tmp_path, family, "sparse_we_moe", "tv_prune_ratio = 0.9"))
    model = auto(tmp_path / "out")
    assert len(model.routers) == 1 and all(g.router is model.routers[0] for g in model.groups)
    base = load_file(family / "base/model.safetensors")
    for t in range(TASKS):
        expert = load_file(family / f"t{t}/model.safetensors")
        delta = expert["encoder.layer.0.intermediate.dense.weight"] - base["encoder.layer.0.intermediate.dense.weight"]
        stored = model.backbone.layers[0].mlp.fc1.delta_weight[t]
        q = torch.quantile(delta.abs().flatten(), 0.9)
        assert int((stored != 0).sum()) == int((delta.abs() > q).sum())
        assert torch.equal(stored, delta * (delta.abs() > q))


def test_rank_one_full_rank_reconstructs(family, tmp_path):
    run("merge", project(tmp_path, family, "rank_one_moe", "rank_k = 16", out="r1"))
    run("merge", project(tmp_path, family, extra="", out="dense", name="p2.toml"))
    rank_one, dense = auto(tmp_path / "r1"), auto(tmp_path / "dense")
    fc1 = rank_one.backbone.layers[0].mlp.fc1
    assert fc1.expert_u.shape == (TASKS * 16, 32) and fc1.expert_v.shape == (TASKS * 16, 16)
    x = inputs()
    with torch.no_grad(), rank_one.forced_routing(torch.full((TASKS * 16,), 0.3)), \
            dense.forced_routing(torch.full((TASKS,), 0.3)):
        a = rank_one(pixel_values=x).pooler_output
        b = dense(pixel_values=x).pooler_output
    assert torch.allclose(a, b, atol=1e-5)  # full rank and all coefficients λ = task arithmetic


def test_pwe_collapse_equals_routed(family, tmp_path):
    run("merge", project(tmp_path, family, "pwe_moe"))
    model = auto(tmp_path / "out")
    assert len(model.groups) == 4  # MLP and attention of both layers
    with torch.no_grad():
        for router in model.routers:
            router.fc1.weight.normal_(0, 0.5)
    x = inputs()
    with torch.no_grad():  # as loaded: the equal preference
        loaded = model(pixel_values=x).pooler_output
        model.set_preference([1.0, 1.0])
        assert torch.equal(model(pixel_values=x).pooler_output, loaded)
    model.set_preference([0.8, 0.2])
    with torch.no_grad():
        routed = model(pixel_values=x).pooler_output
        plain = model.merge_and_unload()(pixel_values=x).pooler_output
        model.set_preference([0.2, 0.8])
        other = model(pixel_values=x).pooler_output
    assert torch.allclose(routed, plain, atol=1e-5)
    assert not torch.allclose(routed, other, atol=1e-4)


def test_task_stream_terms_against_hand_values():
    from mixcli_wemoe.tta import _task_id_loss

    c = torch.tensor([[1.0, 0.0], [0.5, 0.5]])  # two samples, two experts, stream of task 0
    assert float(_task_id_loss([(0, c)], 0, 1, "one_hot")) == pytest.approx((0.25 + 0.25) / 4)
    ce = (-F.log_softmax(torch.tensor([10.0, 0.0]), 0)[0] - F.log_softmax(torch.tensor([5.0, 5.0]), 0)[0]) / 2
    assert float(_task_id_loss([(0, c)], 0, 1, "ce")) == pytest.approx(float(ce), rel=1e-5)
    # rank-one: the oracle puts 1 on every component of the stream's task
    r = torch.tensor([[1.0, 1.0, 0.0, 2.0]])  # experts x k = 2 x 2, stream of task 1
    assert float(_task_id_loss([(0, r)], 1, 2, "one_hot")) == pytest.approx((1 + 1 + 1 + 1) / 4)


def test_bad_inputs(family, tmp_path):
    nohead = tmp_path / "nohead"
    shutil.copytree(family / "t1", nohead)
    (nohead / "head.safetensors").unlink()
    text = project(tmp_path, family, adapt="max_steps = 1").read_text().replace(str(family / "t1"), str(nohead))
    path = write_project(tmp_path, text, "nohead.toml")
    fails(["merge", path], f"nohead.toml: [adapt]: task 't1' has no head.safetensors in {nohead}; each adapted "
                           "task needs its classification head")
    nodata = tmp_path / "nodata"
    shutil.copytree(family / "t1", nodata)
    shutil.rmtree(nodata / "data")
    path = write_project(tmp_path, text.replace(str(nohead), str(nodata)), "nodata.toml")
    fails(["merge", path], f"nodata.toml: [adapt]: task 't1': data file {nodata / 'data/test.safetensors'} "
                           "does not exist")
    fails(["merge", project(tmp_path, family, adapt="max_step = 1", name="typo.toml")],
          "typo.toml: [adapt]: unknown key 'max_step' (did you mean 'max_steps'?)")
    fails(["merge", project(tmp_path, family, adapt='task_id_loss = "mse"', name="form.toml")],
          "form.toml: [adapt]: 'task_id_loss' must be 'ce' or 'one_hot', got 'mse'")
    fails(["merge", project(tmp_path, family, adapt='lr_scheduler_type = "step"', name="sched.toml")],
          "sched.toml: [adapt]: 'lr_scheduler_type' must be 'constant', 'linear', 'cosine', got 'step'")
    fails(["merge", project(tmp_path, family, adapt='lr_schedule = "cosine"', name="old.toml")],
          "old.toml: [adapt]: 'lr_schedule' is now 'lr_scheduler_type'; lr_schedule = \"cosine\" was "
          "lr_scheduler_type = \"cosine\" with min_lr_rate = 0.1")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16)
    torch.manual_seed(0)
    gpt = transformers.GPT2Model(cfg)
    gpt.save_pretrained(tmp_path / "gpt_base")
    gpt.save_pretrained(tmp_path / "gpt_ft")
    path = write_project(tmp_path, f'[models]\nbase = "{tmp_path / "gpt_base"}"\nft = "{tmp_path / "gpt_ft"}"\n'
                                   '[method]\nname = "we_moe"\nbase = "base"\n[output]\npath = "o"\n', "gpt.toml")
    fails(["merge", path], "gpt.toml: [method]: no mlp blocks found in the base model ('gpt2'); we_moe needs "
                           "recognisable Linear blocks (fc1/fc2, gate/up/down_proj, intermediate/output.dense, ...)")
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


class _Counted:
    def __init__(self, compute, name, calls):
        self.compute, self.name, self.calls = compute, name, calls

    def __call__(self):
        self.calls[self.name] += 1
        return self.compute()


def stored(folder):
    """{name: (dtype code, shard file)} from the headers, and the shard files' data sizes."""
    from mixcli.safetensors_io import SafetensorsFile

    tensors, sizes = {}, {}
    for shard in sorted(Path(folder).glob("model*.safetensors")):
        file = SafetensorsFile(shard)
        sizes[shard.name] = sum(info.nbytes for info in file.tensors.values())
        tensors.update({name: (info.dtype, shard.name) for name, info in file.tensors.items()})
    return tensors, sizes


def test_adapt_computes_each_tensor_once_and_writes_the_projects_shards_and_dtype(family, tmp_path,
                                                                                 monkeypatch):
    from collections import Counter

    from mixcli import core

    calls = Counter()
    prepare = core.prepare

    def counting(path):
        prepared = prepare(path)
        for tensor in prepared.plan.tensors:
            tensor.compute = _Counted(tensor.compute, tensor.name, calls)
        return prepared

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        settings = "max_steps = 3\nbatch_size = 4\nlr = 1e-2"
        output = '\ndtype = "bfloat16"\nshard_size = 8000\n'
        plain = project(tmp_path, family, out="plain", name="plain.toml")
        plain.write_text(plain.read_text() + output)
        run("merge", plain)
        merged = project(tmp_path, family, adapt=settings, out="merged", name="merged.toml")
        merged.write_text(merged.read_text() + output)
        run("merge", merged)
        monkeypatch.setattr(core, "prepare", counting)
        adapted = project(tmp_path, family, adapt=settings, out="adapted", name="adapted.toml")
        adapted.write_text(adapted.read_text() + output)
        run("adapt", adapted)
    finally:
        torch.set_num_threads(threads)
    assert calls and set(calls.values()) == {1}, [n for n, c in calls.items() if c != 1]  # each computed once
    initial = tiny_load(tmp_path / "plain")
    for out in ("merged", "adapted"):
        folder = tmp_path / out
        config = json.loads((folder / "config.json").read_text())
        tensors, sizes = stored(folder)
        assert config["dtype"] == "bfloat16" and {code for code, _ in tensors.values()} == {"BF16"}
        index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        assert len(sizes) > 2 and max(sizes.values()) <= 8000
        assert index == {name: shard for name, (_, shard) in tensors.items()}
        state = tiny_load(folder)
        changed = {k for k in state if not torch.equal(state[k], initial[k])}
        assert changed and all(k.startswith("routers.") for k in changed)  # adapted, routers only
        record = config["mixcli"]["adapt"]
        assert record["threads"] == 2  # trained on every core, also inside the merge's writer
        assert all(len(entry["sha256"]["model.safetensors"]) == 64 for entry in config["mixcli"]["inputs"].values())
        model = auto(folder)
        assert all(torch.equal(v.to(torch.bfloat16), state[k]) for k, v in model.state_dict().items())
    merged, adapted = tiny_load(tmp_path / "merged"), tiny_load(tmp_path / "adapted")
    assert all(torch.allclose(merged[k].float(), adapted[k].float(), atol=1e-2) for k in merged)


def tiny_load(folder):
    out = {}
    for shard in sorted(Path(folder).glob("model*.safetensors")):
        out.update(load_file(shard))
    return out


def test_rank_one_factors_computed_once_when_two_threads_ask_together():
    import threading
    import time
    from collections import Counter

    from mixcli_wemoe.rank_one_moe import SVDCache, _experts

    gen = torch.Generator().manual_seed(0)
    weights = {"base": torch.randn(6, 5, generator=gen)}
    weights.update({m: weights["base"] + torch.randn(6, 5, generator=gen) for m in ("a", "b")})
    reads = Counter()

    def read(model, key):
        reads[model] += 1
        time.sleep(0.05)  # both threads are inside before any factors exist
        return weights[model]

    cache = SVDCache()
    made = _experts("cpu", cache)("blk", "weight", "blk.weight", (6, 5), read, ["a", "b"], "base",
                                  {"rank_k": 5, "init_lambda": 0.3})
    start, results = threading.Barrier(2), {}

    def take(part):
        start.wait()
        results[part] = made[part][1]()

    workers = [threading.Thread(target=take, args=(part,)) for part in ("expert_u", "expert_v")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert dict(reads) == {"base": 1, "a": 1, "b": 1} and cache.entries == {}
    for i, m in enumerate("ab"):  # full rank: the components sum to each task vector
        rows = slice(5 * i, 5 * i + 5)
        assert torch.allclose(results["expert_u"][rows].T @ results["expert_v"][rows], weights[m] - weights["base"],
                              atol=1e-5)


def test_adapt_data_mistakes_give_one_line_errors(family, tmp_path):
    def task_copy(name, change):
        folder = tmp_path / name
        shutil.copytree(family / "t1", folder)
        change(folder)
        text = project(tmp_path, family, adapt="max_steps = 1", name=f"{name}.toml").read_text()
        return write_project(tmp_path, text.replace(str(family / "t1"), str(folder)), f"{name}.toml"), folder

    path, folder = task_copy("garbage", lambda f: (f / "data/test.safetensors").write_bytes(b"not safetensors"))
    fails(["adapt", path], f"garbage.toml: [adapt]: task 't1': cannot read {folder / 'data/test.safetensors'} as "
                           "safetensors (Error while deserializing header: header too large); re-save it with "
                           "safetensors.torch.save_file")

    def empty(f):
        (f / "data/test.jsonl").write_text("")
        (f / "task.json").write_text(json.dumps({"data": "data/test.jsonl"}))
    path, folder = task_copy("empty", empty)
    fails(["adapt", path], f"empty.toml: [adapt]: data file {folder / 'data/test.jsonl'} is empty")

    def no_rows(f):
        save_file({"pixel_values": torch.zeros(0, 1, 8, 8)}, str(f / "data/test.safetensors"))
    path, folder = task_copy("none", no_rows)
    fails(["adapt", path], f"none.toml: [adapt]: task 't1': {folder / 'data/test.safetensors'} holds no samples")

    def wide_head(f):
        save_file({"weight": torch.zeros(3, 24), "bias": torch.zeros(3)}, str(f / "head.safetensors"))
    path, folder = task_copy("head", wide_head)
    fails(["merge", path], f"head.toml: [adapt]: task 't1': the head in {folder / 'head.safetensors'} reads 24 "
                           "features; the backbone gives 16 (hidden_size)")
    fails(["adapt", project(tmp_path, family, name="device.toml"), "--device", "gpu"],
          "device.toml: [adapt]: 'device' must be a torch device such as \"cpu\" or \"cuda\", got 'gpu'")
    assert not (tmp_path / "out").exists()


def test_post_sparse_gate_prunes_the_adapted_routers_by_magnitude(family, tmp_path):
    settings = "max_steps = 2\nbatch_size = 4\nlr = 1e-2"
    for name, extra in (("dense", ""), ("pruned", "post_sparse_gate = true\ngate_prune_ratio = 0.5")):
        run("adapt", project(tmp_path, family, "sparse_we_moe", extra=extra, adapt=settings, out=name,
                             name=f"{name}.toml"))
    dense, pruned = tiny_load(tmp_path / "dense"), tiny_load(tmp_path / "pruned")
    routers = [k for k in dense if k.startswith("routers.")]
    assert routers and all(torch.equal(dense[k], pruned[k]) for k in dense if k not in routers)
    for key in routers:  # zero where |t| <= the interpolated 0.5 quantile of |t|, as torch.quantile has it
        t = dense[key]
        q = torch.quantile(t.abs().flatten().float(), 0.5)
        assert torch.equal(pruned[key], t * (t.abs() > q)), key
    record = json.loads((tmp_path / "pruned/config.json").read_text())["mixcli"]["adapt"]
    assert record["post_sparse_gate"]["gate_prune_ratio"] == 0.5 and record["post_sparse_gate"]["zero_fraction"] >= 0.5


@pytest.mark.parametrize("setting, message", [
    ("lr = nan", "'lr' must be a finite number, got nan"),
    ("lr = inf", "'lr' must be a finite number, got inf"),
    ("logit_scale = nan", "'logit_scale' must be a finite number, got nan"),
])
def test_adapt_numbers_that_cannot_train_are_one_line_errors(family, tmp_path, setting, message):
    # lr = nan was a traceback; lr = inf and logit_scale = nan wrote NaN routers, exit 0
    path = project(tmp_path, family, adapt=f"max_steps = 1\n{setting}", name="bad.toml")
    fails(["adapt", path], f"bad.toml: [adapt]: {message}")
    assert not (tmp_path / "out").exists()
