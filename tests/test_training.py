"""The shared training runtime (mixcli.training): the learning-rate schedule against
transformers' schedules and a formula written here, the loop against a loop written by hand,
two torchrun processes against one, and no import cycles between the modules that train."""

import ast
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mixcli import MixcliError
from mixcli.training import Schedule, Step, read_schedule, scheduler, train_steps

ROOT = Path(__file__).resolve().parents[1]


def rates(schedule, total, lr=0.5):
    """The lr each of ``total`` steps uses, read from the optimizer."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched, seen = scheduler(opt, total, schedule), []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


def by_hand(kind, step, total, warmup, floor):
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    t = (step - warmup) / (total - warmup)
    decay = 1 - t if kind == "linear" else (1 + math.cos(math.pi * t)) / 2
    return floor + (1 - floor) * decay


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup, ratio, floor", [(0, 0.0, 0.0), (3, 0.0, 0.0), (0, 0.25, 0.1), (2, 0.9, 0.1)])
def test_schedule_values_equal_the_formula(kind, warmup, ratio, floor):
    total = 10
    steps = warmup or math.ceil(ratio * total)  # warmup_steps wins over warmup_ratio
    seen = rates(Schedule(kind, warmup, ratio, floor), total)
    assert seen == pytest.approx([0.5 * by_hand(kind, s, total, steps, floor) for s in range(total)], rel=1e-12)


def test_schedule_after_warmup_is_transformers_schedule():
    # transformers' warm-up starts at 0 (step s uses s / warmup); ours uses (s + 1) / warmup, one
    # step ahead, and from the end of warm-up on the two are the same curve
    import transformers

    total, warmup = 12, 4
    makers = {"linear": transformers.get_linear_schedule_with_warmup,
              "cosine": transformers.get_cosine_schedule_with_warmup,
              "constant": transformers.get_constant_schedule_with_warmup}
    for kind, make in makers.items():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        theirs = make(opt, warmup, total) if kind != "constant" else make(opt, warmup)
        reference = [theirs.lr_lambdas[0](s) for s in range(total + 1)]
        ours = [Schedule(kind, warmup).factor(s, total) for s in range(total)]
        assert ours[:warmup] == pytest.approx(reference[1:warmup + 1])
        assert ours[warmup:] == pytest.approx(reference[warmup:total])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    floor = transformers.optimization.get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total,
                                                                                 min_lr_rate=0.1)
    assert [Schedule("cosine", warmup, 0.0, 0.1).factor(s, total) for s in range(warmup, total)] == \
        pytest.approx([floor.lr_lambdas[0](s) for s in range(warmup, total)])


@pytest.mark.parametrize("table, message", [
    ({"lr_scheduler_type": "step"}, "'lr_scheduler_type' must be 'constant', 'linear', 'cosine', got 'step'"),
    ({"warmup_steps": -1}, "'warmup_steps' must be >= 0, got -1"),
    ({"warmup_steps": 1.5}, "'warmup_steps' must be a int, got 1.5"),
    ({"warmup_ratio": 1.5}, "'warmup_ratio' must be a number in [0, 1], got 1.5"),
    ({"min_lr_rate": float("nan")}, "'min_lr_rate' must be a number in [0, 1], got nan"),
])
def test_schedule_mistakes_are_one_line_errors(table, message):
    with pytest.raises(MixcliError) as error:
        read_schedule(table, "p.toml: [tune]")
    assert str(error.value) == f"p.toml: [tune]: {message}"


def test_loop_equals_a_loop_written_by_hand():
    # least squares on a fixed batch sequence, SGD with momentum, warm-up then linear decay,
    # gradient clipping: the runtime's loop and this one give the same weights and losses
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 8, 3, generator=gen), torch.randn(6, 8, generator=gen)
    start = torch.randn(3, generator=gen)
    schedule, lr, clip = Schedule("linear", 2, 0.0, 0.0), 0.2, 0.5

    w = torch.nn.Parameter(start.clone())
    opt = torch.optim.SGD([w], lr=lr, momentum=0.9)

    def step(i):
        loss = ((x[i] @ w - y[i]) ** 2).mean()
        return Step(loss, {"loss": loss.item()})

    record = train_steps(step, [w], opt, 6, schedule=schedule, grad_clip=clip, progress=False)

    v, velocity, losses, used = start.clone(), torch.zeros(3), [], []
    for i in range(6):
        residual = x[i] @ v - y[i]
        losses.append(float((residual ** 2).mean()))
        grad = 2 * x[i].T @ residual / len(residual)
        grad = grad * min(1.0, clip / (float(grad.norm()) + 1e-6))
        velocity = grad if i == 0 else 0.9 * velocity + grad
        rate = lr * ((i + 1) / 2 if i < 2 else 1 - (i - 2) / 4)
        used.append(rate)
        v = v - rate * velocity
    assert torch.allclose(w.detach(), v, atol=1e-6)
    assert record.column("loss") == pytest.approx(losses, rel=1e-6)
    assert record.column("lr") == pytest.approx(used) and record.column("step") == [1, 2, 3, 4, 5, 6]


def test_a_step_that_back_propagates_itself():
    # loss None: the step called backward (task by task); the loop only steps the optimizer
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.SGD([w], lr=0.1)

    def step(_):
        (w ** 2).sum().backward()
        (3 * w).sum().backward()
        return Step(None, {})

    record = train_steps(step, [w], opt, 1, progress=False)
    assert torch.allclose(w.detach(), torch.tensor([1.0, -2.0]) - 0.1 * (2 * torch.tensor([1.0, -2.0]) + 3))
    assert record.rows == [{"step": 1, "lr": 0.1}]


SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from mixcli.training import Schedule, Step, all_reduce, distributed, train_steps

    with distributed("cpu") as world:
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(5, 8, 3, generator=gen), torch.randn(5, 8, generator=gen)
        w = torch.nn.Parameter(torch.zeros(3))
        opt = torch.optim.Adam([w], lr=0.1)
        mine = world.share(8, "test")

        def step(i):
            residual = x[i][mine] @ w - y[i][mine]
            total = all_reduce((residual ** 2).sum().detach())
            # each rank's share of the global mean; the runtime averages the ranks' gradients
            return Step((residual ** 2).sum() / 8 * world.size, {"loss": float(total) / 8})

        record = train_steps(step, [w], opt, 5, schedule=Schedule("cosine", 1), progress=False)
        if world.main:
            json.dump({"w": w.tolist(), "loss": record.column("loss"), "size": world.size}, open(sys.argv[1], "w"))
""")


def test_two_torchrun_processes_equal_one(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "one.json")], check=True, env=env, timeout=120)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path / "two.json")], capture_output=True, text=True, env=env,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (one["size"], two["size"]) == (1, 2)
    assert two["w"] == pytest.approx(one["w"], abs=1e-6) and two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert one["w"] != [0.0, 0.0, 0.0]


TRAINING_PACKAGES = {"mixcli_moe": ROOT / "plugins/mixcli-moe/mixcli_moe",
                     "mixcli_wemoe": ROOT / "plugins/mixcli-wemoe/mixcli_wemoe",
                     "mixcli_zoo": ROOT / "plugins/mixcli-zoo/mixcli_zoo"}


def imports_within(package: str, folder: Path) -> dict:
    """module -> the modules of the same package it imports anywhere (functions included)."""
    graph = {}
    for file in folder.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package + "."):
                found.add(node.module.split(".")[1])
        graph[file.stem] = found - {file.stem}
    return graph


@pytest.mark.parametrize("package", TRAINING_PACKAGES)
def test_no_import_cycles_between_the_training_modules(package):
    graph = imports_within(package, TRAINING_PACKAGES[package])

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert [m for m in graph if m in reach(m)] == []


def test_each_training_module_imports_alone():
    modules = ["mixcli.training"] + [f"{p}.{f.stem}" for p, folder in TRAINING_PACKAGES.items()
                                     for f in sorted(folder.glob("*.py")) if f.stem != "__init__"]
    code = textwrap.dedent(f"""
        import importlib, sys
        for name in {modules!r}:
            for loaded in [m for m in sys.modules if m.split(".")[0] in ("mixcli_moe", "mixcli_wemoe", "mixcli_zoo")
                           or m == "mixcli.training"]:
                del sys.modules[loaded]
            importlib.import_module(name)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
