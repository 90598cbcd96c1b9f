"""Prompt templates per concept domain. A concept is always seen by the model inside a template."""

from __future__ import annotations

import importlib
import string
from collections.abc import Callable, Sequence

# Functions that register a domain they know when it is first asked for (``register_domain_provider``): a named
# world's prompt domains ("minicanvas-style") come back in any process, e.g. to re-solve a loaded ledger's requests.
_DOMAIN_PROVIDERS: list[Callable[[str], None]] = []
# Modules that register providers when imported, imported by name on the first miss (the named worlds' registry
# imports this module, so it cannot be imported here).
_PROVIDER_MODULES: tuple[str, ...] = ("diffusers_unlearn.worlds",)


def register_domain_provider(provider: Callable[[str], None]) -> None:
    """``provider(domain)`` is called when ``domain`` is asked for and not registered; it may register it with
    ``register_templates`` (or do nothing when the domain is not its own)."""
    if not callable(provider):
        raise TypeError(f"a domain provider must be callable, got {provider!r}")
    if provider not in _DOMAIN_PROVIDERS:
        _DOMAIN_PROVIDERS.append(provider)


class _Templates(dict):
    """The template registry: a dict whose missing domains are asked of the domain providers first."""

    def __missing__(self, domain: str) -> tuple[str, ...]:
        if provide_domain(domain):
            return dict.__getitem__(self, domain)
        raise KeyError(domain)


def provide_domain(domain: object) -> bool:
    """Whether ``domain`` is registered, after asking the domain providers for it if it was not."""
    if not isinstance(domain, str):
        return False
    if dict.__contains__(TEMPLATES, domain):
        return True
    for module in _PROVIDER_MODULES:
        importlib.import_module(module)
    for provider in list(_DOMAIN_PROVIDERS):
        if dict.__contains__(TEMPLATES, domain):
            break
        provider(domain)
    return dict.__contains__(TEMPLATES, domain)


# Domain -> templates with one "{}" slot for the concept. Module-level so users can add a domain or replace one
# with register_templates; requests record the prompts they used, so later edits do not change old records.
TEMPLATES: dict[str, tuple[str, ...]] = _Templates({
    "style": (
        "an image in {} style",
        "a painting in {} style",
        "a picture of a city in {} style",
        "a portrait in {} style",
    ),
    "object": (
        "a photo of a {}",
        "an image of a {}",
        "a painting of a {}",
        "a picture of a {} in a field",
    ),
    "concept": (
        "{}",
        "an image of {}",
        "a picture of {}",
        "a photo of {}",
    ),
})

DEFAULT_DOMAIN = "concept"


def register_templates(domain: str, templates: Sequence[str], *, replace: bool = False) -> None:
    """Add a prompt domain: the templates a request of that domain trains or solves on, and its checks use.

    Requests record the prompts they used, so replacing a domain's templates later does not change old records.

    Args:
        domain: the domain's name, e.g. ``"food"``; requests then take ``domain="food"``.
        templates: prompts with exactly one ``{}`` slot for the concept, e.g. ``"a plate of {}"``.
        replace: swap the templates of a domain that is already registered (without it, that is refused).

    Raises:
        ValueError: an empty domain name, a template without exactly one ``{}`` slot, or a known domain without
            ``replace=True``.
    """
    if not isinstance(domain, str) or not domain.strip():
        raise ValueError(f"domain must be a non-empty string, got {domain!r}")
    checked = validate_templates(templates)
    if domain in TEMPLATES and not replace:
        raise ValueError(
            f"domain {domain!r} is already registered with templates {list(TEMPLATES[domain])}; pass replace=True "
            f"to swap them. Registered domains: {sorted(TEMPLATES)}"
        )
    TEMPLATES[domain] = checked


def validate_templates(templates: Sequence[str]) -> tuple[str, ...]:
    if isinstance(templates, str) or not templates:
        raise ValueError(f"templates must be a non-empty list of strings with one '{{}}' slot, got {templates!r}")
    for template in templates:
        if not isinstance(template, str) or _slots(template) != [""]:
            raise ValueError(f"each template needs exactly one '{{}}' slot and no other fields (write a literal "
                             f"brace as '{{{{' or '}}}}'), got {template!r}")
    return tuple(templates)


def _slots(template: str) -> list[str] | None:
    """The replacement fields of a ``str.format`` template ("" for ``{}``), or None when it does not parse."""
    try:
        return [f"{name}!{conv}:{spec}" if conv or spec else name
                for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError:
        return None


def check_domain(domain: str | None) -> str:
    domain = DEFAULT_DOMAIN if domain is None else domain
    if not provide_domain(domain):
        raise ValueError(f"unknown domain {domain!r}; known domains: {sorted(TEMPLATES)} (add one with register_templates)")
    return domain


def check_concept(concept: object, what: str = "concept") -> str:
    """A concept is a non-empty string; surrounding whitespace is dropped."""
    if not isinstance(concept, str):
        raise TypeError(f"{what} must be a string, got {type(concept).__name__}: {concept!r}")
    if not concept.strip():
        raise ValueError(f"{what} must be a non-empty string, got {concept!r}")
    return concept.strip()


def same_concept(a: str, b: str) -> bool:
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


def concepts_except(pool: Sequence[str], removed: Sequence[str]) -> list[str]:
    """``pool`` in its order, less every concept that is the same concept as one of ``removed``."""
    return [c for c in pool if not any(same_concept(c, r) for r in removed)]


def concept_prompts(concept: str, domain: str | None = None, templates: Sequence[str] | None = None) -> list[str]:
    """The prompts that stand for ``concept``: each template of its domain filled with it."""
    concept = check_concept(concept)
    chosen = validate_templates(templates) if templates is not None else TEMPLATES[check_domain(domain)]
    return [template.format(concept) for template in chosen]
