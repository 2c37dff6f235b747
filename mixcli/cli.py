"""The command line: parses, calls the core, renders with rich. Heavy imports stay inside
the commands that need them, so ``mixcli --help`` and ``mixcli list-methods`` are fast."""

from __future__ import annotations

import json
from pathlib import Path

import click

from . import __version__
from .errors import MixcliError


class MixcliGroup(click.Group):
    """Adds the plugins' commands on first use, and turns a MixcliError from any command,
    plugins' included, into one line and exit 1."""

    _plugin_commands_added = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plugin_commands: dict[str, list[str]] = {}  # plugin key -> the commands it added

    def _add_plugin_commands(self) -> None:
        if self._plugin_commands_added:
            return
        self._plugin_commands_added = True
        from .plugins import load_plugins, pm

        load_plugins()
        for impl in pm.hook.register_commands.get_hookimpls():
            before = set(self.commands)
            try:
                impl.function(cli=self)
                self.plugin_commands[impl.plugin_name] = sorted(set(self.commands) - before)
            except Exception as error:  # a broken plugin must not take the CLI down
                _console(stderr=True).print(f"[yellow]warning:[/] plugin {impl.plugin_name} could not add "
                                            f"its commands: {error}", soft_wrap=True)

    def list_commands(self, ctx):
        self._add_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx, name):
        self._add_plugin_commands()
        return super().get_command(ctx, name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MixcliError as error:
            raise click.ClickException(str(error)) from None
        except KeyboardInterrupt as error:  # SIGINT, or SIGTERM while writing (the engine has cleaned up)
            signum = getattr(error, "signum", 2)
            click.echo(f"Aborted ({getattr(error, 'name', 'SIGINT')}).", err=True)
            ctx.exit(128 + signum)


@click.group(cls=MixcliGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mixcli")
def cli():
    """Merge and mix neural networks from a TOML project file."""


def _console(stderr: bool = False):
    """Rich output; to a log or a pipe, lines and tables as wide as their content (not 80 columns)."""
    from .progress import console

    return console(stderr)


def _warn_broken_plugins(registry) -> None:
    for warning in registry.warnings:
        _console(stderr=True).print(f"[yellow]warning:[/] {warning}", soft_wrap=True)


def _show_warnings(prepared) -> None:
    """What is odd in the project and its plan; under --strict the first one is the error."""
    from .errors import warn

    for message in prepared.all_warnings():
        warn(message)


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


@cli.command()
@click.argument("project", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output folder (overrides [output] path).")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--dry-run", is_flag=True, help="Check everything and print the plan; write nothing.")
@click.option("--workers", type=click.IntRange(1, 64), help="Tensors merged at once (default: cores + 1, at most 8).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--device", help="Where tensor-wise methods compute: cpu, cuda or cuda:N (overrides [output] device).")
@click.option("--strict", is_flag=True, help="Treat warnings (unmatched filters, NaN inputs...) as errors.")
def merge(project, out, force, dry_run, workers, no_progress, device, strict):
    """Merge the models of PROJECT into one model (each stage in turn for a multi-stage project)."""
    from .errors import strict_warnings

    with strict_warnings(strict):
        _merge(project, out, force, dry_run, workers, no_progress, device)


def _merge(project, out, force, dry_run, workers, no_progress, device):
    from . import core, engine
    from .errors import warn
    from .target import protected_folders

    if _is_multistage(project):
        from .cli_stages import merge_stages

        return merge_stages(project, out, force, dry_run)

    registry = core.get_registry()
    _warn_broken_plugins(registry)
    proj, method = core.load_project(project, registry)
    target = out or proj.output_path
    if target is None:
        raise MixcliError(f"{proj.where}: no output path; add [output] path = \"...\" or pass --out")
    device = _merge_device(device, proj, method)
    if not dry_run:  # before anything is read
        engine.check_target(Path(target).absolute(), force, protected_folders(proj), proj.file)
    prepared = core.prepare(project)
    _show_warnings(prepared)
    prepared.project.output_path = Path(target)
    prepared.project.device = device
    workers = workers or engine.default_workers()
    if dry_run:
        _print_plan(core.describe(prepared, workers), target)
        return
    recipe = core.recipe(prepared.project)
    shown = {name: len(plan.warnings) for name, plan in prepared.plans.items()}
    written = engine.write_plan(prepared.plan, Path(target), force=force, shard_size=proj.shard_size,
                                card=core.model_card(prepared, recipe), recipe=recipe,
                                copy_tokenizer=proj.copy_tokenizer, workers=workers,
                                progress=not no_progress,
                                protected=protected_folders(proj, prepared.models), project_file=proj.file)
    for name, plan in prepared.plans.items():
        for message in plan.warnings[shown[name]:]:  # found while writing (NaN inputs)
            warn(message)
    plans = prepared.plans.values()
    _console().print(f"[green]wrote[/] {written} ({sum(len(p.tensors) for p in plans)} tensors, "
                     f"{_gb(sum(p.output_bytes for p in plans))})")
    for note in (note for plan in plans for note in plan.notes):
        _console().print(note, soft_wrap=True, markup=False)
    if proj.evaluations:
        from .evaluation import evaluate_project, render_results

        results = evaluate_project(prepared.project, written, registry)
        render_results(results, _console())


def _merge_device(option: str | None, proj, method) -> str:
    """--device, else [output] device: checked to be there before anything is read."""
    from .components import MergeMethod
    from .engine import require_device
    from .project import check_device

    where = "--device" if option else f"{proj.where}: [output] device"
    device = check_device(option, where) if option else proj.device
    require_device(device, where)
    if device != "cpu" and not isinstance(method, MergeMethod):
        _console(stderr=True).print(f"[yellow]warning:[/] {where}: method '{method.name}' is not tensor-wise "
                                    "and computes on the CPU", soft_wrap=True)
    return device


def _print_plan(plan: dict, target) -> None:
    from rich.table import Table

    table = Table(title="merge plan (nothing written)", show_header=False)
    table.add_row("method", plan["method"])
    table.add_row("base", str(plan["base"]))
    for name, path in plan["models"].items():
        own = plan["model_parameters"].get(name, {})
        table.add_row(f"model {name}", path + "".join(f"\n  {key} = {_shown(value)}" for key, value in own.items()))
    table.add_row("parameters", "\n".join(f"{key} = {_shown(value)}" for key, value in plan["parameters"].items())
                  or "-")
    table.add_row("settings", "\n".join(f"{key} = {value}" for key, value in plan.get("settings", {}).items()))
    table.add_row("tensors", str(plan["tensors"]))
    table.add_row("layers", str(plan["layers"]))
    table.add_row("input read", _gb(plan["input_bytes"]))
    table.add_row("output size", _gb(plan["output_bytes"]))
    table.add_row("expected peak memory", _gb(plan["peak_memory_bytes"]) + " (working tensors)")
    table.add_row("output", str(target) + ("" if plan["outputs"] == ["."] else
                                          f" (subfolders: {', '.join(plan['outputs'])})"))
    _console().print(table)
    for note in plan.get("notes", []):
        _console().print(note, soft_wrap=True, markup=False)
    if Path(target).exists():
        _console(stderr=True).print(f"[yellow]warning:[/] {target} already exists: `mixcli merge` refuses to "
                                    "write there without --force, and with --force replaces it", soft_wrap=True)


def _shown(value) -> str:
    return value if isinstance(value, str) and value.endswith("(varies by tensor)") else json.dumps(value)


@cli.command()
@click.argument("project", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--strict", is_flag=True, help="Treat warnings (filters that match no tensor...) as errors.")
def validate(project, strict):
    """Check PROJECT: syntax, method, parameters, models, tensor names and shapes."""
    from .errors import strict_warnings

    with strict_warnings(strict):
        _validate(project)


def _validate(project):
    from . import core

    if _is_multistage(project):
        from .cli_stages import check_stages

        return check_stages(project)

    prepared = core.prepare(project)
    _show_warnings(prepared)
    count = sum(len(plan.tensors) for plan in prepared.plans.values())
    _console().print(f"[green]ok[/] {project}: {prepared.project.method}, {len(prepared.models)} models, "
                     f"{count} output tensors")


def _is_multistage(path: Path) -> bool:
    from .stages import is_multistage

    return is_multistage(path)


def _component_rows(registry) -> list[dict]:
    rows = []
    groups = [("method", registry.methods), ("evaluator", registry.evaluators)]
    for key, group in groups:
        for name, component in sorted(group.items()):
            provider = registry.provider[(key, name)]
            rows.append({
                "name": name, "kind": component.kind, "summary": component.summary,
                "package": provider.package, "version": provider.version,
                "parameters": [spec.to_json() for spec in component.param_specs.values()],
            })
    return rows


@cli.command("list-methods")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_methods(name, as_json):
    """Every method and evaluator the installed plugins provide; with NAME, its parameters."""
    from .plugins import get_registry

    registry = get_registry()
    rows = _component_rows(registry)
    if name is not None:
        row = next((r for r in rows if r["name"] == name), None)
        if row is None:
            from .errors import closest

            raise MixcliError(f"unknown method or evaluator '{name}'{closest(name, [r['name'] for r in rows])}; "
                              "`mixcli list-methods` shows them all")
        if as_json:
            click.echo(json.dumps(row, indent=2))
            return
        _print_component(row, registry)
        return
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    _warn_broken_plugins(registry)
    from rich.markup import escape

    console = _console()
    columns = ("name", "kind", "package")
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    room = max(10, console.width - sum(widths.values()) - 2 * len(columns))  # one line per method

    def line(values: dict) -> str:
        summary = values["summary"]
        if len(summary) > room:
            summary = summary[:room - 1] + "…"
        return "  ".join(values[c].ljust(widths[c]) for c in columns) + "  " + summary

    console.print(f"[bold]{escape(line({c: c for c in (*columns, 'summary')}))}[/]", soft_wrap=True)
    for row in rows:
        console.print(escape(line(row)), soft_wrap=True)
    console.print("`mixcli list-methods NAME` shows one's parameters, defaults and ranges.", soft_wrap=True)


def _print_component(row: dict, registry) -> None:
    """One method or evaluator: what it is, then each parameter with its type, default, range
    and meaning (lines, not a table, so that the meanings stay readable at 80 columns)."""
    from rich.markup import escape
    from rich.padding import Padding

    component = registry.methods.get(row["name"]) or registry.evaluators[row["name"]]
    console = _console()
    console.print(f"[bold]{row['name']}[/] ({row['kind']}, {row['package']} {row['version']}): "
                  f"{escape(row['summary'])}")
    specs = list(component.param_specs.values())
    if not specs:
        console.print("no parameters")
    for spec in specs:
        facts = [spec.describe_type() + (" per model" if spec.per_model else ""),
                 "[red]required[/]" if spec.required else f"default {escape(json.dumps(spec.default))}"]
        if spec.describe_range():
            facts.append(escape(spec.describe_range()))
        console.print(Padding(f"[bold]{spec.name}[/]  {', '.join(facts)}", (0, 0, 0, 2), expand=False))
        console.print(Padding(escape(spec.help), (0, 0, 0, 6), expand=False))


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins_command(as_json):
    """Installed plugins, what each provides (methods, evaluators, loaders, commands), and any that failed to load."""
    from .plugins import get_registry

    registry = get_registry()
    provided: dict[str, list[str]] = {}
    for (kind, name), info in registry.provider.items():
        provided.setdefault(info.key, []).append(f"{kind}:{name}")
    cli._add_plugin_commands()
    for key, names in cli.plugin_commands.items():
        provided.setdefault(key, []).extend(f"command:{name}" for name in names)
    rows = [{"name": p.name, "package": p.package, "version": p.version, "module": p.module,
             "provides": sorted(provided.get(p.key, [])), "error": p.error} for p in registry.plugins]
    if as_json:
        click.echo(json.dumps({"plugins": rows, "warnings": registry.warnings}, indent=2))
        return
    from rich.table import Table

    table = Table(title="mixcli plugins")
    for column in ("package", "version", "module", "provides"):
        table.add_column(column, overflow="fold")
    for row in rows:
        provides = f"[red]failed to load: {row['error']}[/]" if row["error"] else ", ".join(row["provides"])
        table.add_row(row["package"], row["version"], row["module"], provides)
    console = _console()
    console.print(table)
    for warning in registry.warnings:
        console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)


class _OccurrenceOrder(click.Command):
    """Keeps the order in which options occur on the command line (ctx.meta["mixcli.order"]),
    which click's per-option value lists lose."""

    def parse_args(self, ctx, args):
        _, _, order = self.make_parser(ctx).parse_args(args=list(args))
        ctx.meta["mixcli.order"] = [param.name for param in order]
        return super().parse_args(ctx, args)


def _params_by_evaluator(order: list[str], evaluators, params) -> list[list[str]]:
    """Each --evaluator's --param values: those after it (before the next --evaluator), after
    those given before the first --evaluator, which apply to every evaluator."""
    shared, own = [], [[] for _ in evaluators]
    e = p = 0
    for name in order:
        if name == "evaluators":
            e += 1
        elif name == "params":
            (own[e - 1] if e else shared).append(params[p])
            p += 1
    return [shared + mine for mine in own]


@cli.command("eval", cls=_OccurrenceOrder)
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--evaluator", "evaluators", multiple=True, help="Evaluator to run on a model folder (repeatable).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Parameter of the --evaluator before it (before any: of every one), VALUE in TOML "
                   "syntax (repeatable).")
@click.option("--device", default="cpu", show_default=True, help="torch device for the forward passes.")
def eval_command(target, evaluators, params, device):
    """Evaluate TARGET: a project file (its output, by its [[evaluation]] entries) or a model folder."""
    from .evaluation import evaluate_project, render_results, run_evaluator, write_results
    from .plugins import get_registry

    registry = get_registry()
    if target.is_file() and target.suffix == ".toml":
        from .core import load_project

        project, method = load_project(target, registry)
        if not project.evaluations:
            raise MixcliError(f"{target}: no [[evaluation]] entries; add one or use --evaluator")
        final = method.final_output(project) if getattr(method, "final_output", None) else None
        model, command = final or (project.output_path, f"mixcli merge {target}")
        if model is None or not Path(model).is_dir():
            raise MixcliError(f"{target}: the output {model} does not exist yet; run `{command}` first")
        rows = evaluate_project(project, Path(model), registry, device)
    else:
        if not target.is_dir():
            raise MixcliError(f"{target}: neither a project file nor a model folder")
        if not evaluators:
            raise MixcliError("give at least one --evaluator (see `mixcli list-methods`)")
        bound = _params_by_evaluator(click.get_current_context().meta.get("mixcli.order", []), evaluators, params)
        rows = []
        for name in evaluators:
            if name not in registry.evaluators:
                from .errors import closest

                raise MixcliError(f"--evaluator: unknown evaluator '{name}'{closest(name, registry.evaluators)}")
        for name, pairs in zip(evaluators, bound):
            settings = _parse_params(pairs)
            metrics = run_evaluator(registry.evaluators[name], target, settings, f"--evaluator {name}", device=device)
            rows.append({"model": str(target), "evaluator": name, "metrics": metrics})
        write_results(rows, Path(str(target).rstrip("/") + ".eval.json"))
    render_results(rows, _console())


def _parse_params(pairs) -> dict:
    import tomli

    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise MixcliError(f"--param {pair!r}: write it as KEY=VALUE")
        try:
            settings[key.strip()] = tomli.loads(f"v = {value}")["v"]
        except tomli.TOMLDecodeError:
            settings[key.strip()] = value  # a bare word is a string
    return settings


def _write_project(out: Path, text: str) -> None:
    try:
        out.write_text(text)
    except OSError as error:
        raise MixcliError(f"{out}: cannot write the project ({error.strerror or error})") from None


@cli.command()
@click.argument("method")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("project.toml"),
              show_default=True, help="Where to write the template.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(method, out, force):
    """Write a commented template project for METHOD."""
    from .plugins import get_registry
    from .template import project_template

    registry = get_registry()
    component = registry.methods.get(method)
    if component is None:
        from .errors import closest

        raise MixcliError(f"unknown method '{method}'{closest(method, registry.methods)}; "
                          "`mixcli list-methods` shows them all")
    if out.exists() and not force:
        raise MixcliError(f"{out} already exists; pass --force to overwrite it")
    _write_project(out, project_template(component))
    _console().print(f"[green]wrote[/] {out}: fill in the model paths, then `mixcli merge {out}`")


@cli.command("import-mergekit")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("project.toml"),
              show_default=True, help="Where to write the mixcli project.")
@click.option("--output-path", help="The project's [output] path (default: out/CONFIG's name).")
@click.option("--force", is_flag=True, help="Overwrite an existing project file.")
def import_mergekit(config, out, output_path, force):
    """Translate the mergekit recipe CONFIG (YAML) into a mixcli project."""
    from .mergekit_yaml import translate
    from .plugins import get_registry
    from .project import check, read_project
    from .tomlwrite import dumps

    registry = get_registry()
    data = translate(config, registry, output_path)
    text = f"# translated from the mergekit recipe {config.name} by `mixcli import-mergekit`\n" + dumps(data)
    try:  # what mixcli reads back: the structure and every parameter
        check(read_project(out, text), registry)
    except MixcliError as error:  # the recipe is what to edit: name it, not the unwritten project
        raise MixcliError(f"{config.name}: the translated project is invalid: {error}") from None
    if out.exists() and not force:
        raise MixcliError(f"{out} already exists; pass --force to overwrite it")
    _write_project(out, text)
    _console().print(f"[green]wrote[/] {out} from {config}: check it with `mixcli validate {out}`", soft_wrap=True)


def main() -> None:
    cli(prog_name="mixcli")
