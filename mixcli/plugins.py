"""The plugin manager: built-in plugins and ``mixcli`` entry points, through the same hooks."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib import metadata

import pluggy

from . import __version__, hookspecs

DEFAULT_PLUGINS = ("mixcli.default_plugins.pretrained", "mixcli.default_plugins.layouts")
ENTRY_POINT_GROUP = "mixcli"


@dataclass
class PluginInfo:
    name: str
    package: str
    version: str
    module: str
    error: str | None = None
    key: str = ""  # the name it is registered under in the plugin manager


@dataclass
class Registry:
    """Everything the plugins registered, by name, with the package that provided it."""

    plugins: list[PluginInfo] = field(default_factory=list)
    methods: dict = field(default_factory=dict)  # merge methods and upscalers share one namespace
    evaluators: dict = field(default_factory=dict)
    loaders: dict = field(default_factory=dict)
    layouts: dict = field(default_factory=dict)  # architecture layouts, by name
    sections: dict = field(default_factory=dict)  # top-level project tables plugins' commands read
    strategies: dict = field(default_factory=dict)  # search strategies (mixcli evolve), by name
    provider: dict = field(default_factory=dict)  # (kind, name) -> PluginInfo
    warnings: list[str] = field(default_factory=list)


pm = pluggy.PluginManager("mixcli")
pm.add_hookspecs(hookspecs)
_loaded: list[PluginInfo] | None = None
_registry: Registry | None = None


def load_plugins() -> list[PluginInfo]:
    """Register the built-in plugins and every ``mixcli`` entry point, once."""
    global _loaded
    if _loaded is not None:
        return _loaded
    _loaded = []
    for module_name in DEFAULT_PLUGINS:
        module = importlib.import_module(module_name)
        pm.register(module, name=module_name)
        _loaded.append(PluginInfo(module_name.rsplit(".", 1)[-1], "mixcli", __version__, module_name,
                                  key=module_name))
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = entry_point.dist
        info = PluginInfo(entry_point.name, dist.name if dist else "?", dist.version if dist else "?",
                          entry_point.value, key=f"{dist.name if dist else '?'}:{entry_point.name}")
        try:
            pm.register(entry_point.load(), name=info.key)
        except Exception as error:  # a broken plugin must not take the CLI down
            info.error = f"{type(error).__name__}: {error}"
        _loaded.append(info)
    return _loaded


def _collect(hook_name: str, kind: str, into: dict, registry: Registry, infos: dict) -> None:
    hook = getattr(pm.hook, hook_name)
    # oldest registration first, so built-ins win a name clash and plugins cannot hijack them
    for impl in hook.get_hookimpls():  # registration order
        info = infos.get(impl.plugin_name)

        def register(component, info=info):
            if component.name in into:
                other = registry.provider[(kind, component.name)]
                registry.warnings.append(f"{info.package} registers {kind} '{component.name}', already "
                                         f"provided by {other.package}; ignored")
                return
            into[component.name] = component
            registry.provider[(kind, component.name)] = info

        try:
            impl.function(register)
        except Exception as error:
            registry.warnings.append(f"plugin {info.package} failed in {hook_name}: "
                                     f"{type(error).__name__}: {error}")


def get_registry() -> Registry:
    """Call the ``register_*`` hooks once and index what they provide."""
    global _registry
    if _registry is not None:
        return _registry
    plugins = load_plugins()
    registry = Registry(plugins=plugins)
    by_plugin_name = {info.key: info for info in plugins}
    for info in plugins:
        if info.error:
            registry.warnings.append(f"plugin {info.package} ({info.module}) failed to load: {info.error}")
    for name, plugin in pm.list_name_plugin():  # registered by hand, e.g. in tests
        by_plugin_name.setdefault(name, PluginInfo(name, name, "?", getattr(plugin, "__name__", name), key=name))
    _collect("register_model_loaders", "loader", registry.loaders, registry, by_plugin_name)
    _collect("register_merge_methods", "method", registry.methods, registry, by_plugin_name)
    _collect("register_upscalers", "method", registry.methods, registry, by_plugin_name)
    _collect("register_evaluators", "evaluator", registry.evaluators, registry, by_plugin_name)
    _collect("register_architecture_layouts", "layout", registry.layouts, registry, by_plugin_name)
    _collect("register_project_sections", "section", registry.sections, registry, by_plugin_name)
    _collect("register_search_strategies", "strategy", registry.strategies, registry, by_plugin_name)
    _registry = registry
    return registry


def register_architectures() -> None:
    """Let plugins add model classes to transformers' Auto classes (imports transformers)."""
    import transformers

    def register(model_type: str, config_class, auto_classes: dict) -> None:
        try:
            transformers.AutoConfig.register(model_type, config_class, exist_ok=True)
        except TypeError:  # older transformers without exist_ok
            try:
                transformers.AutoConfig.register(model_type, config_class)
            except ValueError:
                pass
        for auto_name, model_class in auto_classes.items():
            try:
                getattr(transformers, auto_name).register(config_class, model_class, exist_ok=True)
            except TypeError:
                try:
                    getattr(transformers, auto_name).register(config_class, model_class)
                except ValueError:
                    pass

    load_plugins()
    pm.hook.register_architectures(register=register)


def reset() -> None:
    """Forget loaded plugins (tests that install a plugin call this)."""
    global _loaded, _registry
    for name, plugin in list(pm.list_name_plugin()):
        pm.unregister(plugin, name=name)
    _loaded = None
    _registry = None
    importlib.invalidate_caches()
