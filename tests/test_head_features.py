"""Task heads on backbones without a pooler (a ViT saved with add_pooling_layer=False) and on a
CLIP-style vision tower: the feature named in task.json (or the default) is what WE-MoE (and
its sparse, rank-one and preference variants) and the classification evaluator read; their
accuracies equal one computed here from stock transformers models."""

import json

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import save_file

from conftest import write_project
from mixcli import MixcliError
from mixcli.cli import cli
from mixcli.plugins import get_registry, register_architectures

LAMBDA = 0.5


def vit():
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)
    return transformers.ViTModel(config, add_pooling_layer=False)


def clip():
    config = transformers.CLIPVisionConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                                           num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    return transformers.CLIPVisionModel(config)


def read(output, feature):
    """The head's input, written out here: the first token, or the backbone's pooler output."""
    return output.last_hidden_state[:, 0] if feature == "cls" else output.pooler_output


def make_family(root, build, features):
    """A base and one expert per (task.json "feature", what the head reads) of ``features``
    (its MLPs moved), each with a random head, images and the labels its own model predicts
    (every expert scores 1.0)."""
    torch.manual_seed(0)
    base = build().eval()
    base.save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(1)
    for t, (feature, reads) in enumerate(features):
        model = build().eval()
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".mlp." in name or "intermediate" in name or "output.dense" in name:
                    p.add_(0.01 * torch.randn(p.shape, generator=gen))
        folder = root / f"t{t}"
        model.save_pretrained(folder)
        x = 3 * torch.randn(40, 1, 8, 8, generator=gen)
        with torch.no_grad():
            f = read(model(pixel_values=x), reads)
        # a head over the features' spread around their mean, so that the classes differ by image
        weight = torch.randn(3, 16, generator=gen) / f.std(0)
        bias = -weight @ f.mean(0)
        y = (f @ weight.T + bias).argmax(-1)
        save_file({"weight": weight, "bias": bias}, str(folder / "head.safetensors"))
        save_file({"pixel_values": x, "labels": y}, str(folder / "data.safetensors"))
        info = {"task": f"t{t}", "data": {"train": "data.safetensors", "test": "data.safetensors"}}
        if feature:
            info["feature"] = feature
        (folder / "task.json").write_text(json.dumps(info))
    return root


def load(folder):
    """A saved family member with stock transformers (a ViT without its pooler, as it was saved)."""
    kind = json.loads((folder / "config.json").read_text())["model_type"]
    if kind == "vit":
        return transformers.ViTModel.from_pretrained(folder, add_pooling_layer=False).eval()
    return transformers.CLIPVisionModel.from_pretrained(folder).eval()


def task_arithmetic(root, count):
    base = load(root / "base")
    experts = [load(root / f"t{t}").state_dict() for t in range(count)]
    base.load_state_dict({k: v + LAMBDA * sum(e[k] - v for e in experts) for k, v in base.state_dict().items()})
    return base


def accuracy_of(model, root, t, feature):
    from safetensors.torch import load_file

    data, head = load_file(root / f"t{t}/data.safetensors"), load_file(root / f"t{t}/head.safetensors")
    with torch.no_grad():
        z = read(model(pixel_values=data["pixel_values"]), feature) @ head["weight"].T + head["bias"]
    return (z.argmax(-1) == data["labels"]).float().mean().item()


def merge(root, tmp_path, method, extra="", name="p.toml"):
    models = "\n".join(f't{t} = "{root / f"t{t}"}"' for t in range(2))
    text = (f'[models]\nbase = "{root / "base"}"\n{models}\n[method]\nname = "{method}"\nbase = "base"\n'
            f'init_lambda = {LAMBDA}\n{extra}\n[adapt]\nmax_steps = 1\nlr = 1e-3\nbatch_size = 8\n'
            f'[output]\npath = "{method}"\n')
    result = CliRunner().invoke(cli, ["merge", str(write_project(tmp_path, text, name)), "--no-progress"])
    assert result.exit_code == 0, result.output
    return tmp_path / method


def classification(folder, root):
    from mixcli.evaluation import run_evaluator

    tasks = [str(root / f"t{t}") for t in range(2)]
    got = run_evaluator(get_registry().evaluators["classification"], folder, {"tasks": tasks}, "test",
                        base_dir=folder.parent)
    return [got["t0"], got["t1"]]


@pytest.fixture(scope="module")
def vit_family(tmp_path_factory):
    # t0 names the first token; t1 names nothing, so reads the default: cls, as there is no pooler
    return make_family(tmp_path_factory.mktemp("nopool"), vit, [("cls", "cls"), (None, "cls")])


def test_we_moe_and_the_evaluator_on_a_vit_without_pooler(vit_family, tmp_path):
    root = vit_family
    out = merge(root, tmp_path, "we_moe", "router_std = 0.0")  # routers start at exactly λ: task arithmetic
    reference = task_arithmetic(root, 2)
    expected = [accuracy_of(reference, root, t, "cls") for t in range(2)]
    assert 0.2 < min(expected) and max(expected) < 1.0, expected  # neither useless nor an expert
    record = json.loads((out / "config.json").read_text())["mixcli"]["adapt"]
    assert [record["accuracy_before"][f"t{t}"] for t in range(2)] == pytest.approx(expected)
    register_architectures()
    adapted = transformers.AutoModel.from_pretrained(out).eval()
    after = [accuracy_of(adapted, root, t, "cls") for t in range(2)]
    assert [record["accuracy"][f"t{t}"] for t in range(2)] == pytest.approx(after)
    assert classification(out, root) == pytest.approx(after)
    base = load(root / "base")
    assert classification(root / "base", root) == pytest.approx([accuracy_of(base, root, t, "cls") for t in range(2)])


@pytest.mark.parametrize("method, extra", [("sparse_we_moe", ""), ("rank_one_moe", "rank_k = 4"),
                                           ("pwe_moe", "")])
def test_the_variants_on_a_vit_without_pooler(vit_family, tmp_path, method, extra):
    out = merge(vit_family, tmp_path, method, extra)
    register_architectures()
    model = transformers.AutoModel.from_pretrained(out).eval()
    expected = [accuracy_of(model, vit_family, t, "cls") for t in range(2)]
    assert classification(out, vit_family) == pytest.approx(expected)
    record = json.loads((out / "config.json").read_text())["mixcli"]["adapt"]
    if method != "pwe_moe":  # pwe_moe records its preference front instead
        assert [record["accuracy"][f"t{t}"] for t in range(2)] == pytest.approx(expected)


def test_we_moe_and_the_evaluator_on_a_clip_vision_tower(tmp_path):
    # t0 reads the first token's hidden state, t1 the default: CLIP's pooler output (layer-normed first token)
    (tmp_path / "clip").mkdir()
    root = make_family(tmp_path / "clip", clip, [("cls", "cls"), (None, "pooler")])
    out = merge(root, tmp_path, "we_moe", "router_std = 0.0")
    reference = task_arithmetic(root, 2)
    expected = [accuracy_of(reference, root, 0, "cls"), accuracy_of(reference, root, 1, "pooler")]
    record = json.loads((out / "config.json").read_text())["mixcli"]["adapt"]
    assert [record["accuracy_before"][f"t{t}"] for t in range(2)] == pytest.approx(expected)
    register_architectures()
    adapted = transformers.AutoModel.from_pretrained(out).eval()
    after = [accuracy_of(adapted, root, 0, "cls"), accuracy_of(adapted, root, 1, "pooler")]
    assert classification(out, root) == pytest.approx(after)


def test_a_head_that_reads_a_missing_pooler_is_one_line(vit_family, tmp_path):
    from mixcli.features import head_features, task_feature

    task = json.loads((vit_family / "t0/task.json").read_text())
    with pytest.raises(MixcliError) as error:
        task_feature({**task, "feature": "pooled"}, "t0/task.json", "classification: task 't0'")
    assert str(error.value) == ("classification: task 't0': t0/task.json: \"feature\" must be \"pooler_output\", "
                                "\"cls\", \"mean\", got 'pooled'")
    with torch.no_grad():
        output = vit()(pixel_values=torch.zeros(1, 1, 8, 8))
    with pytest.raises(MixcliError) as error:
        head_features(output, "pooler_output", where="classification: task 't0'")
    assert str(error.value) == ("classification: task 't0': the task reads the pooler output (\"feature\": "
                                "\"pooler_output\" in task.json), but the backbone has no pooler; set \"feature\" "
                                "to \"cls\" or \"mean\"")
    hidden = output.last_hidden_state
    mask = torch.tensor([[1, 1, 0, 0, 0]])
    assert torch.allclose(head_features(output, "mean", mask), hidden[:, :2].mean(1))
    assert torch.equal(head_features(output, None), hidden[:, 0])
