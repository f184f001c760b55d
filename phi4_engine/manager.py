"""One pluggy PluginManager per Engine, and the registry of kinds its plugins register.

Load order: built-in plugins (the modules below, also listed in the ``phi4_engine`` entry-point
group), then third-party entry points, then objects passed to ``Engine(plugins=[...])``; then
``check_pending()`` so a misspelt hook fails at start. Environment switches:

* ``PHI4_ENGINE_LOAD_PLUGINS=a,b`` loads only these third-party plugins (empty: none);
* ``PHI4_ENGINE_DISABLE_PLUGINS=a,b`` skips these plugins, built-in or not;
* ``PHI4_ENGINE_TRACE_PLUGINS=1`` prints every hook call and result to stderr.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

import pluggy
from pydantic import BaseModel

from phi4_engine import __version__, choices, hookspecs
from phi4_engine.errors import PluginError

GROUP = "phi4_engine"
DISTRIBUTION = "phi4-engine"

BUILTIN_PLUGINS: dict[str, str] = {
    "tokenizers": "phi4_engine.plugins.tokenizers",
    "jsonl": "phi4_engine.plugins.jsonl",
    "shards": "phi4_engine.plugins.shards",
    "synthetic": "phi4_engine.plugins.synthetic",
    "schedulers": "phi4_engine.plugins.schedulers",
    "losses": "phi4_engine.plugins.losses",
    "parallelism": "phi4_engine.plugins.parallelism",
    "loggers": "phi4_engine.plugins.loggers",
    "evaluations": "phi4_engine.plugins.evaluations",
    "judges": "phi4_engine.plugins.judges",
    "verifiers": "phi4_engine.plugins.verifiers",
    "stages": "phi4_engine.stages",
}

# registration hook name -> registry category
REGISTRATION_HOOKS: dict[str, str] = {
    "phi4_register_stages": "stage",
    "phi4_register_data_sources": "data_source",
    "phi4_register_tokenizers": "tokenizer",
    "phi4_register_losses": "loss",
    "phi4_register_schedulers": "scheduler",
    "phi4_register_parallelisms": "parallelism",
    "phi4_register_judges": "judge",
    "phi4_register_verifiers": "verifier",
    "phi4_register_evaluations": "evaluation",
}
CATEGORIES = tuple(REGISTRATION_HOOKS.values())


@dataclass(frozen=True)
class PluginOrigin:
    name: str
    distribution: str
    version: str

    def __str__(self) -> str:
        return f"plugin {self.name!r} ({self.distribution} {self.version})"


@dataclass(frozen=True)
class Registration:
    category: str
    kind: str
    spec_model: type[BaseModel]
    factory: Callable[..., Any]
    origin: PluginOrigin


@dataclass
class Registry:
    """Kinds per category, each remembering which plugin registered it."""

    kinds: dict[str, dict[str, Registration]] = field(
        default_factory=lambda: {c: {} for c in CATEGORIES}
    )

    def add(self, reg: Registration) -> None:
        existing = self.kinds[reg.category].get(reg.kind)
        if existing is not None:
            raise PluginError(
                f"{reg.category} kind {reg.kind!r} is registered twice: by {existing.origin} "
                f"and by {reg.origin}"
            )
        _check_spec_model(reg)
        self.kinds[reg.category][reg.kind] = reg

    def get(self, category: str, kind: str) -> Registration:
        try:
            return self.kinds[category][kind]
        except KeyError:
            known = ", ".join(sorted(self.kinds[category])) or "none"
            raise PluginError(f"no {category} kind {kind!r} is registered (known: {known})") from None

    def build(self, category: str, spec: BaseModel, *args: Any) -> Any:
        """Call the factory registered for ``spec.kind``, naming the plugin if it fails."""
        reg = self.get(category, spec.kind)  # type: ignore[attr-defined]
        try:
            built = reg.factory(spec, *args)
        except (PluginError,):
            raise
        except Exception as exc:
            from phi4_engine.errors import EngineError

            if isinstance(exc, EngineError):
                raise
            raise PluginError(
                f"{reg.origin} failed to build {category} {reg.kind!r}: {type(exc).__name__}: {exc}"
            ) from exc
        expected = _RESULT_TYPES.get(category)
        if expected is not None and not isinstance(built, expected):
            raise PluginError(
                f"{reg.origin} built {category} {reg.kind!r} as a {type(built).__name__}; "
                f"expected a phi4_engine.choices.{expected.__name__}"
            )
        missing = [name for name in INTERFACES.get(category, ()) if not hasattr(built, name)]
        if missing:
            hook = next(h for h, c in REGISTRATION_HOOKS.items() if c == category)
            raise PluginError(
                f"{reg.origin} built {category} {reg.kind!r} as a {type(built).__name__}, which lacks "
                f"{', '.join(missing)} (see the {hook} hook's documentation)"
            )
        if category == "verifier":
            return CheckedVerifier(built, reg.origin)
        if category == "data_source":
            _check_documents(built, reg.origin)
        return built


# What the engine calls on what each category's factory returns (checked when it is built).
INTERFACES: dict[str, tuple[str, ...]] = {
    "stage": ("run",),
    "data_source": ("documents",),
    "tokenizer": ("encode", "decode", "vocab_size"),
    "judge": ("score",),
    "verifier": ("verify",),
    "evaluation": ("run",),
}


# Categories whose factories return a plain description of a fixed type.
_RESULT_TYPES: dict[str, type] = {"parallelism": choices.Layout, "scheduler": choices.Schedule}


class CheckedVerifier:
    """A verifier as the engine uses it: ``verify_many`` even when the plugin only has
    ``verify``, and every verdict checked to be a bool (a plugin returning ``"yes"`` or
    ``None`` would otherwise count as a pass or a failure silently)."""

    def __init__(self, inner: Any, origin: PluginOrigin) -> None:
        self.inner, self.origin = inner, origin
        self.name = getattr(inner, "name", None) or type(inner).__name__
        self.version = str(getattr(inner, "version", None) or origin.version)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def verify(self, task_meta: Any, completion: str) -> bool:
        return self._checked([self.inner.verify(task_meta, completion)])[0]

    def verify_many(self, items: Any) -> list[bool]:
        items = list(items)
        if hasattr(self.inner, "verify_many"):
            verdicts = list(self.inner.verify_many(items))
        else:
            verdicts = [self.inner.verify(meta, completion) for meta, completion in items]
        if len(verdicts) != len(items):
            raise PluginError(f"{self.origin}: verifier {self.name!r} returned {len(verdicts)} verdicts for {len(items)} items")
        return self._checked(verdicts)

    def _checked(self, verdicts: list[Any]) -> list[bool]:
        for verdict in verdicts:
            if not isinstance(verdict, bool):
                raise PluginError(
                    f"{self.origin}: verifier {self.name!r} returned {type(verdict).__name__} {verdict!r}; "
                    "verify() must return True or False"
                )
        return verdicts


def _check_documents(source: Any, origin: PluginOrigin) -> None:
    """Make ``source.documents`` name the plugin when it raises or yields something that is not
    a :class:`~phi4_engine.data.source.Document` (errors the engine raises pass unchanged)."""
    from phi4_engine.data.source import Document
    from phi4_engine.errors import EngineError

    inner = source.documents
    name = getattr(source, "name", "?")

    def documents(*args: Any, **kwargs: Any) -> Any:
        try:
            for doc in inner(*args, **kwargs):
                if not isinstance(doc, Document):
                    raise PluginError(
                        f"{origin}: data source {name!r} yielded a {type(doc).__name__}; "
                        "documents() must yield phi4_engine.data.source.Document"
                    )
                yield doc
        except EngineError:
            raise
        except Exception as exc:
            raise PluginError(f"{origin}: data source {name!r} failed: {type(exc).__name__}: {exc}") from exc

    source.documents = documents


def _check_spec_model(reg: Registration) -> None:
    """A kind's spec model must be a pydantic model whose ``kind`` is ``Literal[<kind>]`` (the
    spec's tagged unions are built on it); say so now, naming the plugin, not deep in pydantic."""
    import typing

    model = reg.spec_model
    field_info = getattr(model, "model_fields", {}).get("kind") if isinstance(model, type) else None
    annotation = getattr(field_info, "annotation", None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)) or typing.get_origin(annotation) is not typing.Literal \
            or reg.kind not in typing.get_args(annotation):  # fmt: skip
        raise PluginError(
            f"{reg.origin} registered {reg.category} {reg.kind!r} with spec model "
            f"{getattr(model, '__name__', model)!r}, which needs a field kind: Literal[{reg.kind!r}]"
        )


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def _origin_of(ep: md.EntryPoint) -> PluginOrigin:
    dist = ep.dist
    if dist is None:
        return PluginOrigin(ep.name, "unknown", "unknown")
    return PluginOrigin(ep.name, dist.metadata["Name"], dist.version)


class PluginHost:
    """The PluginManager of one Engine, plus where each plugin came from."""

    def __init__(self, extra_plugins: tuple[Any, ...] = ()) -> None:
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.origins: dict[str, PluginOrigin] = {}
        disabled = set(_env_list("PHI4_ENGINE_DISABLE_PLUGINS") or [])
        allowed = _env_list("PHI4_ENGINE_LOAD_PLUGINS")

        for name, module_name in BUILTIN_PLUGINS.items():
            if name in disabled:
                continue
            origin = PluginOrigin(name, DISTRIBUTION, __version__)
            self._register(self._import(module_name, origin), origin)

        for ep in sorted(md.entry_points(group=GROUP), key=lambda e: e.name):
            origin = _origin_of(ep)
            if origin.distribution == DISTRIBUTION:
                continue  # built-ins were registered above, in a fixed order
            if ep.name in disabled or (allowed is not None and ep.name not in allowed):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(f"{origin} failed to import: {type(exc).__name__}: {exc}") from exc
            self._register(plugin, origin)

        for obj in extra_plugins:
            name = getattr(obj, "__name__", None) or type(obj).__name__
            self._register(obj, PluginOrigin(name, "object", "-"))

        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            origin = self.origins.get(self.pm.get_name(exc.plugin) or "", None)
            raise PluginError(f"{origin or exc.plugin}: {exc}") from exc

        if os.environ.get("PHI4_ENGINE_TRACE_PLUGINS") == "1":
            self.pm.trace.root.setwriter(sys.stderr.write)
            self.pm.enable_tracing()

    @staticmethod
    def _import(module_name: str, origin: PluginOrigin) -> ModuleType:
        try:
            return importlib.import_module(module_name)
        except Exception as exc:
            raise PluginError(f"{origin} failed to import: {type(exc).__name__}: {exc}") from exc

    def _register(self, plugin: Any, origin: PluginOrigin) -> None:
        name = origin.name
        if name in self.origins:
            raise PluginError(f"two plugins are named {name!r}: {self.origins[name]} and {origin}")
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"{origin}: {exc}") from exc
        self.origins[name] = origin

    def collect_registry(self) -> Registry:
        """Call each registration hook of each plugin once, attributing every kind."""
        registry = Registry()
        for hook_name, category in REGISTRATION_HOOKS.items():
            hook = getattr(self.pm.hook, hook_name)
            for impl in reversed(hook.get_hookimpls()):  # registration order
                origin = self.origins[impl.plugin_name]

                def register(kind: str, spec_model: type, factory: Callable[..., Any], *, _o=origin, _c=category) -> None:
                    registry.add(Registration(_c, kind, spec_model, factory, _o))

                try:
                    impl.function(register=register)
                except PluginError:
                    raise
                except Exception as exc:
                    raise PluginError(f"{origin} failed in {hook_name}: {type(exc).__name__}: {exc}") from exc
        return registry

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call a lifecycle hook; an exception is re-raised naming the plugin that raised it."""
        hook = getattr(self.pm.hook, hook_name)
        for impl in reversed(hook.get_hookimpls()):
            try:
                impl.function(**{k: kwargs[k] for k in impl.argnames})
            except Exception as exc:
                origin = self.origins.get(impl.plugin_name, impl.plugin_name)
                raise PluginError(f"{origin} failed in {hook_name}: {type(exc).__name__}: {exc}") from exc

    def describe(self, registry: Registry) -> list[dict[str, Any]]:
        """Plain data about every plugin: name, distribution, version, hooks, kinds."""
        out = []
        for name, origin in self.origins.items():
            plugin = self.pm.get_plugin(name)
            hooks = sorted(impl.name for impl in self.pm.get_hookcallers(plugin) or [])
            kinds: dict[str, list[str]] = {}
            for category, regs in registry.kinds.items():
                mine = sorted(k for k, r in regs.items() if r.origin.name == name)
                if mine:
                    kinds[category] = mine
            out.append(
                {"name": name, "distribution": origin.distribution, "version": origin.version, "hooks": hooks, "kinds": kinds}
            )
        return out
