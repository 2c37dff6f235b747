"""`mixcli init METHOD`: a commented project file that lists every parameter."""

from __future__ import annotations

import json


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return repr(value)


def project_template(component) -> str:
    specs = component.param_specs
    shared = [s for s in specs.values() if not s.per_model]
    per_model = [s for s in specs.values() if s.per_model]
    needs_base = getattr(component, "base", "ignored") != "ignored"
    lines = [f"# mixcli project: {component.name} -- {component.summary}",
             "# Paths are relative to this file; a Hugging Face Hub id works too.", "",
             "[models]"]
    if needs_base:
        lines.append('base = "models/base"')
    model_params = ", ".join(f"{s.name} = {_toml_value(0.5 if s.type is float else s.default) if s.required else _toml_value(s.default)}"
                             for s in per_model)
    for name in ("first", "second"):
        extra = f", {model_params}" if model_params else ""
        lines.append(f'{name} = {{ path = "models/{name}"{extra} }}')
    if per_model:
        lines.append("# per-model parameters (set on a model, or once under [method] for all):")
        for spec in per_model:
            lines.append(f"#   {spec.name}: {spec.help} ({spec.describe_type()}, "
                         f"{'required' if spec.required else 'default ' + _toml_value(spec.default)})")
    lines += ["", "[method]", f'name = "{component.name}"']
    if needs_base:
        lines.append('base = "base"')
    lines.append("seed = 0")
    for spec in shared:
        value = _toml_value(spec.default) if not spec.required else "0.5"
        prefix = "" if spec.required else "# "
        lines.append(f"{prefix}{spec.name} = {value}  # {spec.help}")
    lines += ["", "# Per-tensor values: the first override whose match is a substring of the",
              "# tensor name wins; a list is a gradient across the layers.",
              "# [[method.overrides]]", '# match = "self_attn"']
    if specs:
        first = next(iter(specs.values()))
        lines.append(f"# {first.name} = [0.0, 0.5, 1.0]")
    lines += ["", "[output]", f'path = "out/{component.name}"', '# dtype = "bfloat16"',
              '# shard_size = "2GB"', ""]
    return "\n".join(lines)
