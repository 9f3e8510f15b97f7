"""Spec front ends: text (YAML or the ``.moe`` syntax) -> the ``Spec`` IR, and back."""

from __future__ import annotations

from pathlib import Path

import yaml

from moecompose.errors import Location, SpecError
from moecompose.files import file_problem
from moecompose.spec.check import check_spec
from moecompose.spec.origin import Origin
from moecompose.spec.schema import Spec
from moecompose.spec.yaml_front import parse_yaml

__all__ = ["Origin", "Spec", "check_spec", "dump_data", "dump_yaml", "load_spec", "parse_spec", "syntax_of"]

SYNTAXES = ("yaml", "dsl")
MAX_SPEC_BYTES = 4 * 1024 * 1024


def syntax_of(path: str | Path) -> str:
    """``dsl`` for ``.moe`` files, else ``yaml``."""
    return "dsl" if Path(path).suffix.lower() == ".moe" else "yaml"


def parse_spec(
    text: str,
    *,
    file: str | None = None,
    base_dir: Path | None = None,
    check: bool = True,
    syntax: str | None = None,
) -> Spec:
    """Parse spec text, ``syntax`` ``yaml`` or ``dsl`` (default: by ``file``'s suffix, else
    YAML). With ``check``, also run the source-independent checks."""
    syntax = syntax or (syntax_of(file) if file else "yaml")
    if syntax not in SYNTAXES:
        raise ValueError(f"syntax must be one of {SYNTAXES}, got {syntax!r}")
    if syntax == "yaml":
        spec = parse_yaml(text, file=file, base_dir=base_dir)
        if check:
            check_spec(spec)
        return spec
    from moecompose.spec.dsl import attach_snippet, parse_dsl

    spec = parse_dsl(text, file=file, base_dir=base_dir)
    if check:
        try:
            check_spec(spec)
        except SpecError as exc:
            raise attach_snippet(exc, text, file) from None
    return spec


def load_spec(path: str | Path, *, check: bool = True) -> Spec:
    """Read a spec file (``.moe``: the text syntax, else YAML); relative source paths in it
    are taken from the file's folder."""
    path = Path(path)
    text = read_document(path, "spec", MAX_SPEC_BYTES, hint="give the path of a .yaml or .moe spec file")
    return parse_spec(text, file=str(path), base_dir=path.parent, check=check)


def dump_yaml(spec: Spec) -> str:
    """The normalised YAML form: every default written out, keys in schema order."""
    return dump_data(spec.to_data())


def dump_data(data: dict[str, object]) -> str:
    """Spec data as YAML, keys in the order given (the form of an artifact's spec.yaml)."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


def read_document(path: Path, what: str, max_bytes: int, *, hint: str) -> str:
    """The UTF-8 text of a short document a user names (a spec, a recipe): a missing,
    special, oversized, unreadable or non-UTF-8 file is one located ``SpecError``."""
    problem = file_problem(path)
    if problem == "does not exist":
        raise SpecError(f"{what} file not found", location=Location(str(path)))
    if problem is not None:
        raise SpecError(f"the {what} file {problem}", location=Location(str(path)), hint=hint)
    if path.stat().st_size > max_bytes:
        raise SpecError(f"the {what} file is larger than {max_bytes:,} bytes",
                        location=Location(str(path)), hint=f"a {what} is a short text file")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{what} file not found", location=Location(str(path))) from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise SpecError(
            f"the {what} is not UTF-8 text", location=Location(str(path), line),
            hint="save the file as UTF-8",
        ) from None
    except OSError as exc:
        raise SpecError(
            f"cannot read {what} file: {exc.strerror or exc}", location=Location(str(path))
        ) from None
