"""``${a.b}`` references in a spec: checked here, then resolved by OmegaConf.

A spec may refer to another key's value (``intermediate_size: ${language.intermediate_size}``),
written in OmegaConf's grammar (https://omegaconf.readthedocs.io/en/latest/grammar.html) and
resolved after merging and overrides, as in Hydra. Only plain references are allowed: a resolver
(``${oc.env:SECRET}``) would put environment variables or other outside data into ``show``,
``config.json`` and ``spec.yaml``, so every resolver is a located error. Before OmegaConf runs,
the references are followed here without building anything, so a cycle, a chain deeper than
MAX_CHAIN or a value that would grow past MAX_RESOLVED (a string doubled 30 times) is reported
at once instead of hanging or exhausting memory.
"""

from __future__ import annotations

import re

from moebuild.spec.errors import Diagnostic, SpecPath, format_path
from moebuild.spec.tree import Node, first_line, from_plain, to_plain, walk

_REFERENCE = re.compile(r"\$\{([^${}]*)\}")
_RESOLVER = re.compile(r"\$\{\s*([\w.-]+)\s*:")
_SEGMENT = r"(?:[A-Za-z_][\w-]*(?:\[\d+\])*|\d+)"
_PLAIN = re.compile(rf"\s*({_SEGMENT}(?:\.{_SEGMENT})*)\s*")
MAX_RESOLVED = 100_000
"""Characters (strings) plus values (mappings and lists) all references together may produce."""
MAX_CHAIN = 32
"""Longest chain of references to references."""


class _Unresolvable(Exception):
    def __init__(self, path: SpecPath, message: str):
        self.path, self.message = path, message


def interpolate(root: Node, problems: list[Diagnostic]) -> list[SpecPath]:
    """Resolve every ``${...}`` in place; returns the paths that failed."""
    sites = {path: node for path, node in walk(root) if isinstance(node.value, str) and "${" in node.value}
    if not sites:
        return []
    refs: dict[SpecPath, list[SpecPath]] = {}
    for path, node in sites.items():
        message = _syntax_problem(node.value)
        if message:
            problems.append(node.pos.error(path, message))
        else:
            refs[path] = [_ref_path(body) for body in _REFERENCE.findall(node.value)]
    if len(refs) == len(sites):
        sizes = _Sizes(root, sites, refs)
        try:
            for path in refs:
                sizes.of(path)
        except _Unresolvable as bad:
            problems.append(sites[bad.path].pos.error(bad.path, bad.message))
            refs.clear()
    if len(refs) < len(sites):  # a site left out could be reached through another one: resolve none
        return list(sites)
    return _resolve(root, sites, problems)


def _syntax_problem(text: str) -> str | None:
    example = "write a reference to a key such as ${language.hidden_size}"
    if "\\${" in text:
        return "escaped interpolations (\\${) are not supported"
    resolver = _RESOLVER.search(text)
    if resolver:
        return f"resolvers are not allowed (${{{resolver.group(1)}:...}}); {example}"
    for body in _REFERENCE.findall(text):
        if not _PLAIN.fullmatch(body):
            return f"'${{{body}}}' is not a reference to a key; {example}"
    if "${" in _REFERENCE.sub("", text):
        return "nested or unterminated ${...}; " + example
    return None


def _ref_path(body: str) -> SpecPath:
    keys = re.findall(r"[A-Za-z_][\w-]*|\d+", _PLAIN.fullmatch(body).group(1))
    return tuple(int(k) if k.isdigit() else k for k in keys)


class _Sizes:
    """How large each site's resolved value is, found by following its references (memoised)."""

    def __init__(self, root: Node, sites: dict[SpecPath, Node], refs: dict[SpecPath, list[SpecPath]]):
        self.root, self.sites, self.refs = root, sites, refs
        self.memo: dict[SpecPath, int] = {}
        self.chain: list[SpecPath] = []
        self.total = 0

    def of(self, path: SpecPath) -> int:
        if path in self.memo:
            return self.memo[path]
        if path in self.chain:
            cycle = [*self.chain[self.chain.index(path):], path]
            raise _Unresolvable(self.chain[-1], "cyclic reference: " + " -> ".join(map(format_path, cycle)))
        if len(self.chain) >= MAX_CHAIN:
            raise _Unresolvable(path, f"references chain more than {MAX_CHAIN} deep")
        self.chain.append(path)
        text = self.sites[path].value
        size = (0 if _REFERENCE.fullmatch(text) else len(_REFERENCE.sub("", text))) + sum(
            self._target(ref) for ref in self.refs[path])
        self.chain.pop()
        self.memo[path] = size
        self.total += size
        if self.total > MAX_RESOLVED:
            raise _Unresolvable(path, f"references here would grow the spec past {MAX_RESOLVED:,} characters")
        return size

    def _target(self, ref: SpecPath) -> int:
        node, walked = self.root, ()
        for key in ref:
            if walked in self.sites:  # inside a value that is itself a reference
                return self.of(walked)
            container = node.value
            if isinstance(container, dict) and (key in container or str(key) in container):
                node = container[key] if key in container else container[str(key)]
            elif isinstance(container, list) and isinstance(key, int) and key < len(container):
                node = container[key]
            else:
                return 0  # a missing key: OmegaConf names it
            walked = (*walked, key)
        return self._subtree(walked, node)

    def _subtree(self, path: SpecPath, node: Node) -> int:
        if path in self.sites:
            return self.of(path)
        if isinstance(node.value, dict):
            return 1 + sum(self._subtree((*path, k), child) for k, child in node.value.items())
        if isinstance(node.value, list):
            return 1 + sum(self._subtree((*path, i), child) for i, child in enumerate(node.value))
        return len(str(node.value))


def _resolve(root: Node, sites: dict[SpecPath, Node], problems: list[Diagnostic]) -> list[SpecPath]:
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        config = OmegaConf.create(to_plain(root))
    except OmegaConfBaseException as exc:
        problems.append(root.pos.error((), f"cannot interpolate: {first_line(exc)}"))
        return list(sites)
    failed = []
    for path, node in sites.items():
        try:
            value = config
            for key in path:
                value = value[key]
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value, resolve=True)
        except OmegaConfBaseException as exc:
            problems.append(node.pos.error(path, f"cannot resolve {node.value!r}: {first_line(exc)}"))
            failed.append(path)
            continue
        node.value = from_plain(value, node.pos).value
    return failed

