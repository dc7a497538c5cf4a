"""Plugin discovery (the ``alignkit`` entry-point group) and the per-run pluggy PluginManager.

Discovery: every entry point in the group names a class (an algorithm, a reward or a task). Built-in
plugins are declared in alignkit's own ``pyproject.toml`` exactly like a third-party package declares
its own. Listing them (:func:`discover`, ``alignkit plugins``) lives in :mod:`alignkit.discovery`, which
reads the sources instead of importing torch. Selection is by ``class_path`` in the recipe; only the
selected instances are registered with a run's manager, so competing implementations never race. Built-in
defaults are registered ``trylast``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import Any

import pluggy

from alignkit import hookspecs
from alignkit.discovery import PluginInfo, discover, discover_commands  # noqa: F401  (listing: alignkit.discovery)
from alignkit.errors import PluginError
from alignkit.plugin import Algorithm, Reward, RewardOutput
from alignkit.types import LossOutput, Rollout

GROUP = "alignkit"


def plugin_kind(obj: Any) -> str:
    from alignkit.task import Task

    cls = obj if inspect.isclass(obj) else type(obj)
    for base, kind in ((Algorithm, "algorithm"), (Reward, "reward"), (Task, "task")):
        if issubclass(cls, base):
            return kind
    return "other"


def implemented_hooks(obj: Any) -> tuple[str, ...]:
    """Names of the hooks a plugin class (or instance) implements with ``@hookimpl``."""
    return tuple(
        name for name in dir(obj)
        if name.startswith("alignkit_") and hasattr(getattr(obj, name, None), "alignkit_impl")
    )


def class_path_of(name: str) -> str | None:
    """The ``module.Class`` path of the plugin registered as ``name`` in the ``alignkit`` entry-point group, None
    when no plugin has that name; a :class:`PluginError` when two installed packages use it."""
    found = sorted({ep.value for ep in entry_points(group=GROUP) if ep.name == name})
    if len(found) > 1:
        raise PluginError(f"plugin name {name!r} is registered by several packages ({', '.join(found)}): give the "
                          f"class_path instead")
    return found[0].replace(":", ".") if found else None


def find_task(name: str):
    """The task class registered under entry-point ``name`` (e.g. "sentiment")."""
    tasks = {ep.name: ep for ep in entry_points(group=GROUP)}
    if name not in tasks:
        known = sorted(i.name for i in discover() if i.kind == "task")
        raise ValueError(f"unknown task {name!r}; registered tasks: {', '.join(known) or 'none'}")
    return tasks[name].load()


def plugin_name(plugin: Any) -> str:
    return f"{type(plugin).__module__}.{type(plugin).__qualname__}"


#: What each hook's implementations may return (besides None). Checked at every call, so a wrong answer is
#: reported naming the plugin that gave it rather than failing later in the host.
HOOK_RESULTS: dict[str, type | tuple[type, ...]] = {
    "alignkit_configure": object, "alignkit_rollout": Rollout, "alignkit_score": RewardOutput,
    "alignkit_experience": object, "alignkit_minibatches": Iterable, "alignkit_loss": LossOutput,
    "alignkit_after_update": object, "alignkit_metrics": dict,
}


def build_manager(plugins: list[Any]) -> pluggy.PluginManager:
    """A fresh manager holding the built-in defaults (``trylast``) and the given plugin instances.

    Hooks are called through pluggy (``pm.hook.<name>(**kwargs)``), so wrapper implementations
    (``@hookimpl(wrapper=True)``) and pluggy's tracing see every call. Each plain implementation is wrapped
    once here so that an exception or a wrong return type is reported as a :class:`PluginError` naming the
    plugin and the hook."""
    from alignkit.defaults import DEFAULTS

    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    for plugin in [*DEFAULTS, *plugins]:
        try:
            pm.register(plugin, name=f"{plugin_name(plugin)}#{id(plugin)}")
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {plugin_name(plugin)} does not match the hook specifications: {exc}") from exc
    try:
        pm.check_pending()  # an @hookimpl whose name is no known hook (a typo) is an error
    except pluggy.PluginValidationError as exc:
        raise PluginError(str(exc)) from exc
    for hook, caller in vars(pm.hook).items():
        if isinstance(caller, pluggy.HookCaller):
            for impl in caller.get_hookimpls():
                if not (impl.wrapper or impl.hookwrapper):
                    # pluggy marks HookImpl.function Final; replacing it is how the wrapper reaches every call
                    impl.function = _named_errors(hook, _short(impl.plugin_name), impl.function)  # type: ignore[misc]
    return pm


def _short(plugin_name: str) -> str:
    return plugin_name.split("#")[0]


def _check(hook: str, plugin: str, result: Any, expect: type | tuple[type, ...]) -> None:
    if not isinstance(result, expect):
        names = expect.__name__ if isinstance(expect, type) else " or ".join(t.__name__ for t in expect)
        raise PluginError(f"plugin {plugin} returned {type(result).__name__} from hook {hook}, expected {names}")


def _named_errors(hook: str, plugin: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` (one plugin's implementation of ``hook``), raising a :class:`PluginError` that names the
    plugin when it fails or answers with a type the hook does not allow."""

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            result = function(*args, **kwargs)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin {plugin} failed in hook {hook}: {type(exc).__name__}: {exc}") from exc
        if result is not None:
            _check(hook, plugin, result, HOOK_RESULTS.get(hook, object))
        return result

    return call


def _candidates(pm: pluggy.PluginManager, hook: str) -> str:
    impls = [i for i in getattr(pm.hook, hook).get_hookimpls() if not (i.wrapper or i.hookwrapper)]
    return " or ".join(_short(i.plugin_name) for i in reversed(impls)) or "none"


def call_first(pm: pluggy.PluginManager, hook: str, expect: type | tuple[type, ...], **kwargs: Any) -> Any:
    """Call a firstresult hook through pluggy; a failure, a missing answer or a wrong type raises a
    :class:`PluginError` naming the plugin and the hook."""
    result = _call(pm, hook, expect, kwargs)
    if result is None:
        raise PluginError(f"no plugin implements hook {hook}; the selected algorithm must provide it")
    return result


def call_each(pm: pluggy.PluginManager, hook: str, expect: type | tuple[type, ...], **kwargs: Any) -> list[Any]:
    """Call every implementation of a hook through pluggy (in its order); None answers are skipped."""
    return list(_call(pm, hook, expect, kwargs))


def _call(pm: pluggy.PluginManager, hook: str, expect: type | tuple[type, ...], kwargs: dict[str, Any]) -> Any:
    caller = getattr(pm.hook, hook)
    result = caller(**kwargs)
    firstresult = bool(caller.spec and caller.spec.opts.get("firstresult"))
    # What reaches the host, after any wrapper implementation, must be what this call site expects.
    for item in ([result] if firstresult else result) if result is not None else []:
        _check(hook, _candidates(pm, hook), item, expect)
    return result
