"""mkdocs hook (mkdocs.yml ``hooks:``): every public name on the API reference's pages must have a docstring.

mkdocstrings silently leaves out a public function without a docstring; this hook makes it a warning, which the
strict build (``mkdocs build --strict``, tests/test_docs.py) turns into a failure. "Public" means: a module-level
function or class of a module the reference renders (``::: vaelab.<module>`` in docs/reference/), or a method of such
a class, whose name has no leading underscore and that is defined in vaelab itself (not imported into the module).
Two kinds of method are exempt because their contract is the base class's, already documented there and in the
class docstring: ``forward`` of a ``torch.nn.Module`` and the ``torch.distributions.Distribution`` interface
(``log_prob``, ``sample``, ``rsample``, ``entropy``, ``expand``, ``support``, ``enumerate_support``, ``cdf``,
``icdf``) of a Distribution subclass.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.docstrings")

_DIRECTIVE = re.compile(r"^:::\s+(vaelab(?:\.\w+)*)\s*$", re.MULTILINE)
_NN_MODULE = {"forward"}
_DISTRIBUTION = {"log_prob", "sample", "rsample", "entropy", "expand", "support", "enumerate_support", "cdf", "icdf"}
_EXEMPT = _NN_MODULE | _DISTRIBUTION


def _missing(obj, top: bool = True) -> list[str]:
    found = []
    for name, member in obj.members.items():
        if name.startswith("_") or member.is_alias or member.is_attribute:
            continue
        if not (top or name not in _EXEMPT):
            continue
        if not member.docstring:
            found.append(member.path)
        if member.is_class and top:
            found += _missing(member, top=False)
    return found


def on_pre_build(config) -> None:
    import griffe

    root = Path(config["docs_dir"]).parent
    modules = sorted(
        {m for page in Path(config["docs_dir"], "reference").glob("*.md") for m in _DIRECTIVE.findall(page.read_text())}
    )
    package = griffe.load("vaelab", search_paths=[str(root / "src")], docstring_parser="google")
    for path in modules:
        obj = package[path.removeprefix("vaelab.")] if path != "vaelab" else package
        if not obj.is_module:
            continue
        for name in _missing(obj):
            log.warning(f"public name without a docstring: {name} (docs/reference renders {path})")
