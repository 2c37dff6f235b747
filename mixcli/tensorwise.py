"""Planning a tensor-wise merge: groups of same-named tensors across the models (remapped
through [[slices]]), with every parameter resolved per tensor before anything is read."""

from __future__ import annotations

import contextlib
from functools import reduce

from .architecture import (check_layer_count, head_name, head_source, is_tied, layer_templates, map_config,
                           tensor_role)
from .checkpoint import Checkpoint
from .components import MergeMethod
from .errors import MixcliError, Warnings, warn
from .params import NOTHING, resolve
from .plan import OutputPlan, OutputTensor, all_finite, nonfinite_message, output_dtype_name, set_dtype
from .project import Project
from .safetensors_io import torch_dtype
from .seeding import derive_seed
from .slices import Slice, Source, slices as plan_slices
from .vocabulary import align, row_plan

# a linear-algebra method's matrix this large on both sides gets all cores to itself; smaller
# ones run one per core (benchmarks/bench_singular.py measures the cross-over)
INTRA_OP_MIN_SIDE = 1024


def _global_setting(project: Project, key: str, model: str | None = None):
    """[method] value with [[method.overrides]] in front of it, as one filtered list."""
    entries = [{"filter": o.match, "value": o.params[key]} for o in project.overrides
               if key in o.params and (o.models is None or model is None or model in o.models)]
    if key in project.params:
        entries.append({"filter": None, "value": project.params[key]})
    return entries or NOTHING


def _stored_name(source: Source, name: str) -> str | None:
    """The name under which ``source`` stores ``name``: itself, a tied model's embedding for
    the head, or None."""
    if name in source.ckpt.tensors:
        return name
    if name == head_name(source.ckpt):
        return head_source(source.ckpt)
    return None


class _Planner:
    def __init__(self, project: Project, method: MergeMethod, models: dict[str, Checkpoint]):
        self.project = project
        self.method = method
        self.models = models
        self.specs = method.param_specs
        self.compute_dtype = project.compute_dtype
        self.vocabulary = None  # the output vocabulary of a [tokenizer] table
        self._vocab_names: dict[int, set[str]] = {}
        self.warnings = Warnings()  # the plan's, shared with every _Compute

    def _vocabulary_indexed(self, members) -> bool:
        from .alignment import vocabulary_tensors

        if self.vocabulary is None:
            return False
        for source, name in members:
            names = self._vocab_names.setdefault(id(source.ckpt), vocabulary_tensors(source.ckpt))
            if name not in names:
                return False
        return True

    def group(self, piece: Slice, out_name: str, in_names: list[str], position: float) -> OutputTensor:
        method, project = self.method, self.project
        members = list(zip(piece.sources, in_names))
        infos = [s.ckpt.tensors[n] for s, n in members]
        shape = infos[0].shape
        rows = None
        if self._vocabulary_indexed(members):  # re-indexed into the output vocabulary first
            rows = row_plan(self.vocabulary, [s.model for s, _ in members], piece.base)
            shape = (rows.rows,) + tuple(shape[1:])
        for (source, name), info in zip(members[1:], infos[1:]):
            if (info.shape[1:] if rows else info.shape) != (infos[0].shape[1:] if rows else infos[0].shape):
                raise MixcliError(
                    f"tensor '{out_name}': model '{members[0][0].model}' has shape {list(infos[0].shape)} "
                    f"but model '{source.model}' has {list(info.shape)}; the models must share one architecture")
        floating = {info.floating for info in infos}
        if len(floating) > 1:
            raise MixcliError(f"tensor '{out_name}': floating and integer versions across the models")
        base_index = None
        if method.base != "ignored" and piece.base is not None:
            base_index = next(i for i, s in enumerate(piece.sources) if s.model == piece.base)
        others = [i for i in range(len(members)) if i != base_index]
        where = f"tensor '{out_name}'"
        shared = {}
        for key, spec in self.specs.items():
            if spec.per_model:
                continue
            levels = [piece.params.get(key, NOTHING), _global_setting(project, key)]
            shared[spec.field] = resolve(spec, levels, out_name, position, f"{piece.where}, {where}")
        per_model = {}
        for key, spec in self.specs.items():
            if not spec.per_model:
                continue
            values = []
            for i in others:
                source, name = members[i]
                levels = [source.params.get(key, NOTHING), project.models[source.model].params.get(key, NOTHING),
                          piece.params.get(key, NOTHING), _global_setting(project, key, source.model)]
                values.append(resolve(spec, levels, name, position, f"model '{source.model}', {where}"))
            per_model[spec.field] = values
        fills = False
        if floating == {True}:
            loaded = _code(project.dtype) if project.dtype else _promote([info.dtype for info in infos])
            out_code = _code(project.out_dtype) if project.out_dtype else loaded
            # in place only when the method computes in the written dtype (see _Compute)
            working = _code(self.compute_dtype) if self.compute_dtype else loaded
            fills = method.accepts_out and working == out_code
        else:
            out_code = infos[0].dtype
        seed = derive_seed(project.seed, out_name) if method.random else None
        if method.check is not None:  # reject parameter values that cannot work, before reading
            try:
                method.check(**shared, **per_model)
            except MixcliError as error:
                raise MixcliError(f"{where}: {error}") from None
        reads = [(s.ckpt, n) for s, n in members]
        compute = _Compute(self, out_name, reads, base_index, others, shared, per_model, seed, out_code,
                           floating == {True}, rows)
        details = {k: v for k, v in shared.items()}
        details.update({k: v for k, v in per_model.items()})
        details["models"] = [members[i][0].model for i in others]
        if base_index is not None:
            details["base"] = members[base_index][0].model
        if rows is not None:
            details["vocabulary_rows"] = rows.rows
        work_bytes = None
        if method.working_memory is not None and floating == {True}:
            work_bytes = method.working_memory(tuple(shape), len(members))
        intra_op = (method.linear_algebra and len(shape) == 2 and floating == {True}
                    and min(shape) >= INTRA_OP_MIN_SIDE)
        return OutputTensor(out_name, tuple(shape), out_code, compute, reads, details,
                            fill=compute.fill if fills else None, work_bytes=work_bytes, intra_op=intra_op)


def _code(name: str) -> str:
    return {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}[name]


def _promote(codes: list[str]) -> str:
    """torch.promote_types over floating dtype codes, without importing torch."""
    kinds = set(codes)
    if len(kinds) == 1:
        return codes[0]
    for wide in ("F64", "F32"):
        if wide in kinds:
            return wide
    return "F32"  # bfloat16 with float16 (or float8) promotes to float32


class _Compute:
    """Computes one output tensor on demand (a class, not a closure, so plans stay readable)."""

    checks_finite = True  # its inputs, so the engine need not check the output

    def __init__(self, planner, name, reads, base_index, others, shared, per_model, seed, out_code, floating,
                 rows=None):
        self.method = planner.method
        self.project = planner.project  # its device is read when computing: --device sets it after planning
        self.load_dtype = planner.project.dtype
        self.compute_dtype = planner.compute_dtype
        self.warnings = planner.warnings
        self.name, self.reads, self.base_index, self.others = name, reads, base_index, others
        self.shared, self.per_model, self.seed, self.out_code, self.floating = \
            shared, per_model, seed, out_code, floating
        self.rows = rows  # a vocabulary.RowPlan: re-index the rows before merging

    def __call__(self):
        return self._run(None)

    def fill(self, target) -> None:
        """Compute into ``target``, a tensor of the output's shape and dtype."""
        self._run(target)

    def _run(self, target):
        import torch

        tensors = [ckpt.tensor(name) for ckpt, name in self.reads]
        if not self.floating:
            for (ckpt, name), tensor in zip(self.reads[1:], tensors[1:]):
                if not torch.equal(tensor, tensors[0]):
                    raise MixcliError(f"tensor '{self.name}': integer tensor differs between models "
                                      f"('{self.reads[0][0].name}' and '{ckpt.name}'); it cannot be merged")
            result = tensors[0]
        else:
            device = self.project.device
            if device != "cpu":
                tensors = [t.to(device) for t in tensors]
            _check_finite(self.reads, tensors, self.warnings)
            if self.load_dtype:
                tensors = [t.to(getattr(torch, self.load_dtype)) for t in tensors]
            working = reduce(torch.promote_types, (t.dtype for t in tensors))
            if self.compute_dtype:
                working = getattr(torch, self.compute_dtype)
            tensors = [t.to(working) for t in tensors]
            if self.rows is not None:
                tensors = align(tensors, self.rows)
            kwargs = dict(self.shared)
            kwargs.update(self.per_model)
            if self.seed is not None:
                kwargs["seed"] = self.seed
            if self.method.wants_name:
                kwargs["name"] = self.name
            if target is not None and self.method.accepts_out and target.dtype == working and device == "cpu":
                kwargs["out"] = target  # computed straight into the output file
            base = tensors[self.base_index] if self.base_index is not None else None
            try:
                # on a device, tensors the method creates (buffers, weights) default to it too
                with torch.device(device) if device != "cpu" else contextlib.nullcontext():
                    result = self.method.merge([tensors[i] for i in self.others], base, **kwargs)
            except MixcliError as error:
                raise MixcliError(f"tensor '{self.name}': {error}") from None
            if tuple(result.shape) != tuple(tensors[0].shape):
                raise RuntimeError(f"method '{self.method.name}' returned shape {list(result.shape)} for "
                                   f"'{self.name}', expected {list(tensors[0].shape)}")
        if target is None:
            return result.to(torch_dtype(self.out_code)).cpu()
        if result is not target:
            target.copy_(result)
        return target


def _check_finite(reads, tensors, warnings: Warnings) -> None:
    """NaN or Inf in an input would spread silently through the merge: say which one holds it."""
    for (ckpt, name), tensor in zip(reads, tensors):
        if not all_finite(tensor):
            warnings.add(nonfinite_message(ckpt, name))


def plan_merge(project: Project, method: MergeMethod, models: dict[str, Checkpoint]) -> OutputPlan:
    """The output plan of a tensor-wise merge; raises MixcliError on any inconsistency."""
    from .alignment import apply_to_config, plan_vocabulary

    for name, ckpt in models.items():
        check_layer_count(ckpt, project.models[name].where)
    pieces = plan_slices(project, models)
    planner = _Planner(project, method, models)
    planner.vocabulary = plan_vocabulary(project, models)
    for piece in pieces:
        names = [s.model for s in piece.sources]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate and method.base != "ignored":
            raise MixcliError(f"{piece.where}: model '{duplicate}' is listed twice")
        inputs = len(names)
        if method.base == "required" and piece.base is None:
            raise MixcliError(f"{project.where}: [method] method '{method.name}' needs a base model; "
                              f"add base = \"<one of: {', '.join(project.models)}>\"")
        if method.base != "ignored" and piece.base is not None:
            if piece.base not in names:
                raise MixcliError(f"{piece.where}: the base model '{piece.base}' must be one of the sources")
            inputs -= 1
        low, high = method.min_inputs, method.max_inputs
        if inputs < low or (high is not None and inputs > high):
            count = f"exactly {low}" if low == high else (f"at least {low}" if high is None else f"{low} to {high}")
            besides = " besides the base" if method.base != "ignored" else ""
            raise MixcliError(f"{piece.where}: method '{method.name}' takes {count} model(s){besides}, got {inputs}")

    first, last = pieces[0], pieces[-1]
    ref_layers = []
    tensors: list[OutputTensor] = []
    single = len(pieces) == 1
    tensors += _outside_layers(planner, first, None if single else ("pre",))
    out_index = 0
    for piece in pieces:
        layers = [layer_templates(s.ckpt)[0] for s in piece.sources]
        for j in range(piece.length):
            position = j / (piece.length - 1) if piece.length > 1 else 1.0
            reference = layers[0].get(piece.sources[0].start + j, set())
            for source, source_layers in zip(piece.sources[1:], layers[1:]):
                theirs = source_layers.get(source.start + j, set())
                if theirs != reference:
                    odd = sorted(theirs ^ reference)[0].format(source.start + j)
                    raise MixcliError(f"{piece.where}: layer {piece.sources[0].start + j} of "
                                      f"'{piece.sources[0].model}' and layer {source.start + j} of "
                                      f"'{source.model}' hold different tensors (first: '{odd}')")
            for template in sorted(reference):
                in_names = [template.format(s.start + j) for s in piece.sources]
                tensors.append(planner.group(piece, template.format(out_index), in_names, position))
            ref_layers.append((piece.sources[0].model, piece.sources[0].start + j))
            out_index += 1
    if not single:
        # the head comes from the last slice, even when all its sources are tied, unless the
        # output embedding is the very same merge (same models in both end slices)
        same_ends = [s.model for s in first.sources] == [s.model for s in last.sources]
        tensors += _outside_layers(planner, last, ("post", "head"), head_always=not same_ends)

    donor = models[project.base] if project.base else first.sources[0].ckpt
    donor_name = project.base or first.sources[0].model
    if project.slices is not None and donor.num_layers is not None:
        config = map_config({name: ckpt.config for name, ckpt in models.items()}, donor_name, ref_layers,
                            f"{project.where}: [[slices]]")
    else:
        config = dict(donor.config)
    floating = [t.dtype for t in tensors if t.dtype in ("F32", "F16", "BF16", "F64")]
    if floating:
        set_dtype(config, output_dtype_name(max(set(floating), key=floating.count)))
    head = head_name(donor)
    if head is not None and any(t.name == head for t in tensors):
        config["tie_word_embeddings"] = False  # a written head must not be replaced by the embedding
    elif head is not None and all(is_tied(s.ckpt) for s in last.sources):
        config["tie_word_embeddings"] = True  # no head written: the embedding is the head
    plan = OutputPlan(config=config, tensors=tensors, donor=donor, warnings=planner.warnings)
    vocabulary = planner.vocabulary
    if vocabulary is not None:
        from .vocabulary import tokenizer_files

        apply_to_config(plan.config, vocabulary)
        plan.extra_files.update(tokenizer_files(vocabulary))
        plan.own_tokenizer = True
        plan.notes += vocabulary.summary()
        for message in vocabulary.warnings:  # shown with the plan's other warnings, errors under --strict
            plan.warnings.add(message)
    elif project.copy_tokenizer and not donor.tokenizer_files():  # the output would load without one
        plan.warnings.add(f"model '{donor_name}' ({donor.path}) has no tokenizer files, so the output has none; "
                          "copy a tokenizer into it, or make a model with one the first or the base")
    return plan


def _outside_layers(planner: _Planner, piece: Slice, roles: tuple[str, ...] | None,
                    head_always: bool = False) -> list[OutputTensor]:
    """The output tensors outside the layers (of ``roles``; None: all) that any source of
    ``piece`` holds. A tied source gives its embedding as the head; a tensor only some sources
    hold follows the method's ``partial_tensors``."""
    names: set[str] = set()
    for source in piece.sources:
        _, others = layer_templates(source.ckpt)
        names.update(n for n in others if roles is None or tensor_role(source.ckpt, n) in roles)
    head = head_name(piece.sources[0].ckpt)
    # a head any source stores is in ``names`` already (tied sources then give their embedding);
    # when none stores one they are all tied, and so is the output, unless asked for a head
    if head is not None and head_always and all(is_tied(s.ckpt) for s in piece.sources):
        names.add(head)
    out = []
    for name in sorted(names):
        held = [(s, _stored_name(s, name)) for s in piece.sources]
        if all(stored is not None for _, stored in held):
            out.append(planner.group(piece, name, [stored for _, stored in held], 0.0))
        else:
            tensor = _partial(planner, piece, name, [(s, n) for s, n in held if n is not None],
                              [s for s, n in held if n is None])
            if tensor is not None:
                out.append(tensor)
    return out


def _partial(planner: _Planner, piece: Slice, name: str, held: list, lacking: list) -> OutputTensor | None:
    """A tensor outside the layers that only some sources hold, as ``method.partial_tensors`` says."""
    method = planner.method
    have = ", ".join(f"'{s.model}'" for s, _ in held)
    lack = ", ".join(f"'{s.model}'" for s in lacking)
    where = f"{piece.where}: tensor '{name}' is in model(s) {have} but not in {lack}"
    base = piece.base if method.base != "ignored" else None
    base_member = next(((s, n) for s, n in held if s.model == base), None)
    not_base = f"{piece.where}: tensor '{name}' is in model(s) {have} but not in the base '{base}'"
    if method.partial_tensors == "base_or_skip":
        if base_member is not None:
            return _copy(planner, base_member, name)
        warn(f"{not_base}; method '{method.name}' leaves it out of the output")
        return None
    if method.partial_tensors == "singleton":
        if len(held) == 1:
            return _copy(planner, held[0], name)
        raise MixcliError(f"{where}; method '{method.name}' copies such a tensor only from a single model; "
                          "give all models the tensor or remove it from all but one")
    if base is not None and base_member is None and method.base == "required":
        raise MixcliError(f"{not_base}; method '{method.name}' cannot merge it without the base's")
    others = [m for m in held if m is not base_member]
    if not others:
        return _copy(planner, base_member, name)
    if len(others) < method.min_inputs:
        raise MixcliError(f"{where}; method '{method.name}' needs {method.min_inputs} models besides the "
                          "base to merge it")
    subset = Slice([s for s, _ in held], piece.length, base if base_member else None, piece.params, piece.where)
    return planner.group(subset, name, [n for _, n in held], 0.0)


class _CopyOne:
    """Reads one source tensor and casts it to the written dtype."""

    checks_finite = True

    def __init__(self, ckpt, name: str, load_dtype: str | None, out_code: str, warnings: Warnings):
        self.ckpt, self.name, self.load_dtype, self.out_code = ckpt, name, load_dtype, out_code
        self.warnings = warnings

    def __call__(self):
        import torch

        tensor = self.ckpt.tensor(self.name)
        if not tensor.is_floating_point():
            return tensor
        _check_finite([(self.ckpt, self.name)], [tensor], self.warnings)
        if self.load_dtype:
            tensor = tensor.to(getattr(torch, self.load_dtype))
        return tensor.to(torch_dtype(self.out_code))


def _copy(planner: _Planner, member, out_name: str) -> OutputTensor:
    source, name = member
    project, info = planner.project, source.ckpt.tensors[name]
    code = info.dtype
    if info.floating:
        code = _code(project.out_dtype or project.dtype) if (project.out_dtype or project.dtype) else info.dtype
    compute = _CopyOne(source.ckpt, name, project.dtype if info.floating else None, code, planner.warnings)
    return OutputTensor(out_name, info.shape, code, compute, [(source.ckpt, name)],
                        {"source": source.model, "tensor": name})
