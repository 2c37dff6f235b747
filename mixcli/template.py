"""`mixcli init METHOD`: a commented project file that lists every parameter.

The template is built from the method's record alone (its base rule, input counts, parameter
specs and ``example`` values), so that once its model paths point at suitable models it
validates and merges, for every registered method, plugins' included.
"""

from __future__ import annotations

from .tomlwrite import inline as toml_value

ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")
PLACEHOLDER = {float: 0.5, int: 1, bool: False, str: "", list: [], dict: {}}


def model_names(component) -> list[str]:
    """The template's models: ``base`` when the method takes one, then ``first``, ``second``..."""
    base = getattr(component, "base", "ignored")
    counts_base = component.kind != "merge" and base != "ignored"  # upscalers count every model
    low, high = component.min_inputs, component.max_inputs
    if counts_base:
        low, high = max(low - 1, 1), (None if high is None else high - 1)
    count = max(low, 2) if high is None else min(max(low, 2), high)
    names = [ORDINALS[i] if i < len(ORDINALS) else f"model_{i + 1}" for i in range(count)]
    return (["base"] if base != "ignored" else []) + names


def _value(spec, example: dict):
    """What the template writes for a parameter: (value, active), or (None, False) for none."""
    if spec.name in example:
        return example[spec.name], True
    if spec.required:
        return PLACEHOLDER.get(spec.type, 0.5), True
    return spec.default, False


def _for_model(value, name: str):
    """Per-model example values may say ``{model}``: each model gets its own name there."""
    if isinstance(value, str):
        return value.replace("{model}", name)
    if isinstance(value, list):
        return [_for_model(v, name) for v in value]
    return value


def _described(spec) -> str:
    default = "required" if spec.required else (
        "no default" if spec.default is None else "default " + toml_value(spec.default))
    return f"{spec.help} ({spec.describe_type()}, {default})"


def project_template(component) -> str:
    specs = component.param_specs
    example = dict(getattr(component, "example", {}) or {})
    shared = [s for s in specs.values() if not s.per_model]
    per_model = [s for s in specs.values() if s.per_model]
    names = model_names(component)
    base = getattr(component, "base", "ignored")
    lines = [f"# mixcli project: {component.name} -- {component.summary}",
             "# Paths are relative to this file; a Hugging Face Hub id works too.", "",
             "[models]"]
    active_per_model = [(s, *_value(s, example)) for s in per_model]
    for name in names:
        extra = "".join(f", {s.name} = {toml_value(_for_model(v, name))}" for s, v, active in active_per_model
                        if active and name != "base")
        lines.append(f'{name} = {{ path = "models/{name}"{extra} }}')
    if per_model:
        lines.append("# per-model parameters (set on a model, or once under [method] for all):")
        for spec in per_model:
            lines.append(f"#   {spec.name}: {_described(spec)}")
    lines += ["", "[method]", f'name = "{component.name}"']
    if base != "ignored":
        lines.append('base = "base"')
    lines.append("seed = 0")
    for spec in shared:
        value, active = _value(spec, example)
        if active:  # an example value that is not the default says what the default is
            said = _described(spec) if not spec.required and value != spec.default else spec.help
            lines.append(f"{spec.name} = {toml_value(value)}  # {said}")
        else:
            shown = toml_value(value) if value is not None else toml_value(PLACEHOLDER.get(spec.type, 0.5))
            lines.append(f"# {spec.name} = {shown}  # {_described(spec)}")
    if component.kind == "merge":
        numeric = next((s for s in specs.values() if s.type in (float, int) and s.type is not bool), None)
        lines += ["", "# Per-tensor values: the first override whose match is a substring of the",
                  "# tensor name wins; a list is a gradient across the layers.",
                  "# [[method.overrides]]", '# match = "self_attn"']
        if numeric is not None:
            lines.append(f"# {numeric.name} = [0.0, 0.5, 1.0]")
    for section in getattr(component, "sections", ()):
        lines += ["", f"# [{section}]  # optional: see `mixcli list-methods` and the plugin's README"]
    lines += ["", "[output]", f'path = "out/{component.name}"', '# dtype = "bfloat16"',
              '# shard_size = "2GB"', ""]
    return "\n".join(lines)
