"""A minimal mixcli plugin that implements every hook once.

Copy it to start your own: ``pip install -e .`` makes ``mixcli list-methods`` show
``example_scale``, ``example_repeat_layers`` and ``example_tensor_count``, and teaches mixcli
the tensor names of the ``mixcli-example-stages`` model type; a project may carry an
``[example_notes]`` table, and ``mixcli evolve`` may search with ``strategy = "example_random"``.
"""

from dataclasses import dataclass

import click

import mixcli


@dataclass
class ScaleParams:
    factor: float = mixcli.param(1.0, help="multiply every weight of the single input by this")


def scale(tensors, base, factor):
    """A tensor-wise method: a pure function of the input tensors."""
    return tensors[0] * factor


@dataclass
class RepeatParams:
    times: int = mixcli.param(2, help="how many copies of each layer", min=1)


def repeat_layers(context):
    """An upscaler: every layer of the one input model repeated ``times`` times."""
    from mixcli.architecture import layer_templates, map_config
    from mixcli.plan import OutputPlan, OutputTensor

    (ckpt,) = context.models.values()
    times = context.params["times"]
    layers, others = layer_templates(ckpt)
    tensors = [OutputTensor(n, ckpt.tensors[n].shape, ckpt.tensors[n].dtype,
                            lambda n=n: ckpt.tensor(n), [(ckpt, n)]) for n in others]
    mapping = [i for i in sorted(layers) for _ in range(times)]
    for out_index, source in enumerate(mapping):
        for template in sorted(layers[source]):
            name = template.format(source)
            info = ckpt.tensors[name]
            tensors.append(OutputTensor(template.format(out_index), info.shape, info.dtype,
                                        lambda name=name: ckpt.tensor(name), [(ckpt, name)]))
    config = map_config({"a": ckpt.config}, "a", [("a", i) for i in mapping], "example_repeat_layers")
    return OutputPlan(config=config, tensors=tensors, donor=ckpt)


@dataclass
class CountParams:
    match: str = mixcli.param("", help="count only tensors whose name contains this")


def count_tensors(context):
    """An evaluator: the number of tensors (and elements) in the model folder."""
    from mixcli.checkpoint import open_safetensors

    tensors = open_safetensors(context.model_path, str(context.model_path))
    chosen = [info for name, info in tensors.items() if context.params["match"] in name]
    elements = 0
    for info in chosen:
        count = 1
        for size in info.shape:
            count *= size
        elements += count
    return {"tensors": len(chosen), "elements": elements}


def load_linked(ref):
    """A loader: ``link:PATH`` references the save_pretrained folder written in the file PATH."""
    from pathlib import Path

    from mixcli.checkpoint import Checkpoint, open_safetensors, read_config

    folder = Path((ref.project_dir / ref.path[len("link:"):]).read_text().strip())
    return Checkpoint(ref.name, folder, read_config(folder, ref.where), open_safetensors(folder, ref.where))


@mixcli.hookimpl
def register_merge_methods(register):
    register(mixcli.MergeMethod(name="example_scale", summary="scale one model's weights",
                                merge=scale, params=ScaleParams, base="ignored", min_inputs=1,
                                max_inputs=1))


@mixcli.hookimpl
def register_upscalers(register):
    register(mixcli.Upscaler(name="example_repeat_layers", summary="repeat every layer",
                             build=repeat_layers, params=RepeatParams, min_inputs=1, max_inputs=1))


@mixcli.hookimpl
def register_evaluators(register):
    register(mixcli.Evaluator(name="example_tensor_count", summary="count tensors and elements",
                              evaluate=count_tensors, params=CountParams,
                              metrics={"tensors": "higher", "elements": "higher"}))


@mixcli.hookimpl
def register_model_loaders(register):
    register(mixcli.ModelLoader(name="example_link", summary="link:FILE holding a folder path",
                                accepts=lambda ref: ref.path.startswith("link:"), load=load_linked))


@mixcli.hookimpl
def register_architectures(register):
    from transformers import PretrainedConfig, PreTrainedModel

    class ExampleConfig(PretrainedConfig):
        model_type = "mixcli-example"

    class ExampleModel(PreTrainedModel):
        config_class = ExampleConfig

    register("mixcli-example", ExampleConfig, {"AutoModel": ExampleModel})


@mixcli.hookimpl
def register_architecture_layouts(register):
    # a model family whose blocks are named trunk.stage.N and whose head is head.out.weight
    register(mixcli.ArchitectureLayout(
        name="example_stages", summary="trunk.stage.N blocks, stem.embed input, head.out output",
        model_types=("mixcli-example-stages",), layer_pattern=r"(^|\.)stage\.(?P<index>\d+)\.",
        embeddings=("stem.embed.weight",), head="head.out.weight", pre_layer_hints=("stem.",)))


def check_notes(project, method, registry):
    """A project section: [example_notes] author = "..." (any project may carry it)."""
    author = project.sections["example_notes"].get("author")
    if not isinstance(author, str) or not author:
        raise mixcli.MixcliError(f"{project.where}: [example_notes] author must be a non-empty string")


@mixcli.hookimpl
def register_project_sections(register):
    register(mixcli.ProjectSection(name="example_notes", summary="who wrote the project", check=check_notes))


class RandomSearch:
    """A search strategy: each generation, popsize points drawn around the start (no learning)."""

    def __init__(self, x0, sigma0, popsize, seed, binary=()):
        import numpy as np

        self.x0, self.sigma0, self.popsize = np.asarray(x0, dtype=float), sigma0, popsize
        self.rng = np.random.default_rng(seed)

    def ask(self):
        return [[float(v) for v in self.x0 + self.sigma0 * self.rng.standard_normal(len(self.x0))]
                for _ in range(self.popsize)]

    def tell(self, genotypes, losses):
        pass


@mixcli.hookimpl
def register_search_strategies(register):
    register(mixcli.SearchStrategy(name="example_random", summary="random points around the start",
                                   create=RandomSearch))


@mixcli.hookimpl
def register_commands(cli):
    @cli.command(name="example-hello")
    @click.argument("name", default="world")
    def hello(name):
        """Say hello (a command added by a plugin)."""
        click.echo(f"hello, {name}")
