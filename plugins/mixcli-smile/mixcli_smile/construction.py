"""The output plan of smile_upscaling (imports torch; loaded by ``build``).

Tensor names are those of the SMILE model class built from the output config (see
:mod:`mixcli_smile.modeling`); each is computed on demand by the streaming engine. The task
vector of one Linear and one fine-tune is decomposed once, by whichever of its tensors (router
rows, ``u``, ``svh``) the engine computes first, and dropped when the last has taken it.
"""

from __future__ import annotations

from mixcli import MixcliError
from mixcli.architecture import check_layer_count
from mixcli.backbone import checkpoint_names, renamer
from mixcli.plan import OutputPlan, OutputTensor
from mixcli.provenance import record_input_hashes
from mixcli.svd import SVDCache, drop_negligible

from .smile_upscaling import SVD_INPUTS, _check, describe_model, extra_parameters, linear_shapes

CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
DTYPES = {"F16": "float16", "BF16": "bfloat16", "F64": "float64", "F32": "float32"}


def _stored(model) -> list[str]:
    """State-dict names a checkpoint of ``model`` stores: tied duplicates (lm_head) left out."""
    unique = {name for name, _ in model.named_parameters()}
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return [name for name in model.state_dict() if name in unique or name not in every]


def task_factors(w0, wi, gate_k: int, k: int, full_matrices: bool = True, routing_use_diff: bool = True,
                 device: str = "cpu"):
    """One fine-tune's share of a SMILE Linear, in float32 on the CPU: (router rows
    ``V_{gate_k}ᵀ`` [gate_k, d_in], ``u = U_k`` [d_out, k], ``svh = S_k V_kᵀ`` [k, d_in]) of its
    task vector ``wi − w0`` (the router from the SVD of ``wi`` without ``routing_use_diff``);
    ``u`` and ``svh`` are None for dense experts (``k <= 0``)."""
    import torch

    w0, wi = w0.to(device, torch.float32), wi.to(device, torch.float32)
    delta = wi - w0
    u, s, vh = torch.linalg.svd(delta if routing_use_diff else wi, full_matrices=full_matrices)
    gate = vh[:gate_k].cpu()
    if k <= 0:
        return gate, None, None
    if not routing_use_diff:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = s.numel()
    u, s, vh = drop_negligible(delta, u[:, :r], s, vh[:r])  # numerically zero components are zeros
    return gate, u[:, :k].cpu(), (s[:k, None] * vh[:k]).cpu()


def model_from_plan(plan: OutputPlan, device: str = "cpu"):
    """The planned SMILE model in memory (nothing written): every tensor computed once, in the
    dtype the plan writes, and copied into the model's own parameter."""
    import torch

    from .modeling import CONFIGS, MODELS

    config = dict(plan.config)
    model_type = config.pop("model_type")
    architecture = config.pop("architectures")[0]
    model_class = next(c for c in MODELS[model_type].values() if c.__name__ == architecture)
    model = model_class(CONFIGS[model_type](**config))
    state = model.state_dict(keep_vars=True)  # the parameters themselves
    with torch.no_grad():
        for tensor in plan.tensors:
            state[tensor.name].data = tensor.compute()
            for ckpt, name in tensor.reads:
                ckpt.release(name)
    model.tie_weights()
    return model.to(device).eval()


def plan(context) -> OutputPlan:
    import torch

    from . import __version__

    project, p = context.project, context.params
    where = f"{project.where}: [method]"
    base = context.models[project.base]
    experts = [name for name in context.models if name != project.base]
    for name, ckpt in context.models.items():
        check_layer_count(ckpt, project.models[name].where)
    base_where = project.models[project.base].where
    base_cfg = dict(base.config)
    plain, root, config_class, model_class = describe_model(base_cfg, base_where)
    prefix = next((f"{name}." for name, module in plain.named_modules() if module is root and name), "")
    linears = linear_shapes(root, p["modules"])
    if not linears:
        filt = f" whose path contains one of modules = {p['modules']}" if p["modules"] else ""
        raise MixcliError(f"{where}: the '{base_cfg.get('model_type')}' base model has no Linear{filt} that "
                          "smile_upscaling can upscale; check modules")
    _check(p, linears, len(experts), where, base_cfg.get("model_type"))
    n, gate_k, k = len(experts), p["gate_k"], p["k"]

    stored = _stored(plain)
    rename = renamer(plain)
    maps = {name: checkpoint_names(plain, ckpt, project.models[name].where, rename, stored)
            for name, ckpt in context.models.items()}
    for name in experts:
        for key in stored:
            a, b = context.models[name].tensors[maps[name][key]], base.tensors[maps[project.base][key]]
            if a.shape != b.shape:
                raise MixcliError(f"{project.models[name].where}: tensor '{key}' has shape {list(a.shape)}, "
                                  f"the base has {list(b.shape)}; all models must share one architecture")
    chosen = project.out_dtype or project.dtype
    first = base.tensors[maps[project.base][stored[0]]].dtype
    out_code = CODES[chosen] if chosen else first if first in ("F16", "BF16", "F64") else "F32"
    out_dtype = getattr(torch, DTYPES[out_code])
    device = p["upscaling_accelerator"]
    if device.startswith("cuda") and not torch.cuda.is_available():
        device = "cpu"  # the accelerator is optional: SMILE's factors do not depend on the device

    def read(model: str, key: str):
        return context.models[model].tensor(maps[model][key]).to(torch.float32)

    def reads(key: str, models=None):
        return [(context.models[m], maps[m][key]) for m in (models or [project.base] + experts)]

    def cast(t):
        return t.to(out_dtype).contiguous()

    tensors: list[OutputTensor] = []
    plan_warnings = None  # the plan's, once made (computes add to it while writing)

    def add(name, shape, compute, key=None, details=None, models=None, work=None):
        tensors.append(OutputTensor(name, tuple(shape), out_code, compute, reads(key, models) if key else [],
                                    details or {}, work_bytes=work, intra_op=work is not None))

    cache = SVDCache(takers=1 + (2 if k > 0 else 0))  # router rows, and u and svh of low-rank experts
    unchanged: dict[str, int] = {}  # Linear -> experts whose task vector was zero (for the warning)

    def factors(path: str, key: str, i: int):
        """(router rows [R, d_in], u [d_out, K], svh [K, d_in]) of fine-tune i's task vector."""
        def compute():
            w0 = read(project.base, key)
            wi = read(experts[i], key)
            delta = wi - w0
            if not bool(delta.abs().max() > 0):
                unchanged[path] = unchanged.get(path, 0) + 1
                if unchanged[path] == n:
                    plan_warnings.add(f"{where}: no fine-tuned model changes Linear '{prefix}{path}': its SMILE "
                                      "experts are zero (it computes the pretrained Linear); leave it out with "
                                      "modules")
            return task_factors(w0, wi, gate_k, k, p["full_matrices"], p["routing_use_diff"], device)
        return cache.take((path, i), compute)

    routed = {f"{prefix}{path}": path for path in linears}
    biased = set()
    for name in stored:
        module_path, _, attr = name.rpartition(".")
        if module_path not in routed:
            if p["average_experts"]:
                def mean(name=name):
                    return cast(sum(read(m, name) for m in experts) / n)
                add(name, plain.state_dict()[name].shape, mean, name, {"merge": "average"}, experts)
            else:
                add(name, plain.state_dict()[name].shape, lambda name=name: cast(read(project.base, name)), name,
                    {"merge": "pretrained"}, [project.base])
            continue
        path = routed[module_path]
        d_out, d_in = linears[path]
        if attr == "bias":
            biased.add(path)
            add(f"{module_path}.shared_linear.bias", (d_out,), lambda name=name: cast(read(project.base, name)),
                name, {"merge": "pretrained"}, [project.base])
            for i, m in enumerate(experts):
                def bias_delta(name=name, m=m):
                    return cast(read(m, name) - read(project.base, name))
                add(f"{module_path}.experts.{i}.bias", (d_out,), bias_delta, name, {"merge": "task_vector"},
                    [project.base, m])
            continue
        rank = min(d_out, d_in)
        square = d_in * d_in if p["full_matrices"] else rank * d_in
        work = 4 * (SVD_INPUTS * d_out * d_in + square + d_out * rank)
        add(f"{module_path}.shared_linear.weight", (d_out, d_in), lambda name=name: cast(read(project.base, name)),
            name, {"merge": "pretrained"}, [project.base])

        def gate(path=path, name=name):
            return cast(torch.cat([factors(path, name, i)[0] for i in range(n)]))
        add(f"{module_path}.gate.weight", (n * gate_k, d_in), gate, name, {"merge": "smile_router"}, work=work)
        for i, m in enumerate(experts):
            if k > 0:
                add(f"{module_path}.experts.{i}.u", (d_out, k),
                    lambda path=path, name=name, i=i: cast(factors(path, name, i)[1]), name,
                    {"merge": "smile_expert"}, [project.base, m], work)
                add(f"{module_path}.experts.{i}.svh", (k, d_in),
                    lambda path=path, name=name, i=i: cast(factors(path, name, i)[2]), name,
                    {"merge": "smile_expert"}, [project.base, m], work)
            else:
                def dense(name=name, m=m):
                    return cast(read(m, name) - read(project.base, name))
                add(f"{module_path}.experts.{i}.weight", (d_out, d_in), dense, name, {"merge": "task_vector"},
                    [project.base, m])

    fields = {"num_local_experts": n, "num_experts_per_tok": p["top_k"], "rank_of_router": gate_k,
              "rank_of_expert": k if k > 0 else -1, "smile_modules": list(linears)}
    # sha256 is filled in once the output is written (finalize): planning reads no weight
    provenance = {"format": "mixcli-smile/1", "plugin_version": __version__, "method": "smile_upscaling",
                  "parameters": dict(p), "experts": experts, "seed": context.seed,
                  "inputs": {name: {"path": str(ckpt.path), "role": "base" if name == project.base else "expert",
                                    "sha256": None} for name, ckpt in context.models.items()}}
    data = {key: value for key, value in base_cfg.items() if key not in ("model_type", "architectures")}
    smile_config = config_class(**fields, mixcli=provenance, **data)
    with torch.device("meta"):
        skeleton = model_class(smile_config)
    expected, produced = set(_stored(skeleton)), {t.name for t in tensors}
    if expected != produced:  # a bug, not a user mistake
        raise RuntimeError(f"plan/model mismatch: {sorted(expected ^ produced)[:5]}")
    pretrained = sum(plain.state_dict()[name].numel() for name in stored)
    router, expert = extra_parameters(linears, n, gate_k, k, biased)
    total = sum(_numel(t.shape) for t in tensors)
    if total != pretrained + router + expert:  # a bug: the formula and the tensors disagree
        raise RuntimeError(f"SMILE parameter count {total} != {pretrained} + {router} + {expert}")
    out = smile_config.to_dict()
    out["architectures"] = [model_class.__name__]
    out["dtype"] = DTYPES[out_code]
    out.pop("torch_dtype", None)
    notes = [f"SMILE: {len(linears)} Linears upscaled, {n} experts (gate_k {gate_k}, k "
             f"{k if k > 0 else 'dense'}, top_k {p['top_k']}); parameters {total:,} = pretrained {pretrained:,} + "
             f"routers {router:,} + experts {expert:,} ({total / pretrained:.2f}x the pretrained model)"]
    folders = {name: ckpt.path for name, ckpt in context.models.items()}
    result = OutputPlan(config=out, tensors=tensors, donor=base, notes=notes,
                        finalize=lambda folder: record_input_hashes(folder, folders))
    plan_warnings = result.warnings
    return result


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
