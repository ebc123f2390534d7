"""Config validation: pydantic models in, one ``<field>: <problem>; <fix>`` line out; YAML with no key twice."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

from overlap_bench.errors import UserError
from overlap_bench.metrics import DTYPES


class FieldError(UserError):
    """A config field with a bad value; the one-line message is ``field: problem; fix``."""


class Config(BaseModel):
    """Base of the config models: strict types (``"5"`` is not 5), unknown keys refused, finite numbers only."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)


def listed(v: Any) -> list:
    """``v`` as a non-empty list (a single value becomes a list of one; ``Listed`` on a field)."""
    if v == []:
        raise ValueError("is empty; give at least one value")
    return v if isinstance(v, list) else [v]


Listed = BeforeValidator(listed)


def _dtype(v: str) -> str:
    if v not in DTYPES:
        raise ValueError(f"unknown dtype {v!r}; use one of {', '.join(DTYPES)}")
    return v


Dtype = Annotated[str, AfterValidator(_dtype)]  # an element type the strategies serve (metrics.DTYPES)

PROBLEMS = {"missing": "is missing; add it", "extra_forbidden": "unknown key; remove it or fix its spelling",
            "invalid_key": "unknown key; keys are names", "int_type": "must be an integer", "float_type": "must be a "
            "number", "finite_number": "must be a finite number", "bool_type": "must be true or false", "string_type":
            "must be text", "dict_type": "must be a mapping", "model_type": "must be a mapping", "list_type": "must be "
            "a list", "greater_than_equal": "must be >= {ge}", "greater_than": "must be > {gt}", "less_than_equal":
            "must be <= {le}", "less_than": "must be < {lt}", "too_short": "must have at least {min_length} item(s)",
            "too_long": "must have at most {max_length} item(s)",
            "literal_error": "must be one of {expected}"}
"""pydantic's error types in our words (``int_parsing`` reads as ``int_type``: a value from text)."""
FIRST = ("extra_forbidden", "invalid_key")  # named before other errors: a misspelt key is also a missing one


def problem(err: dict) -> str:
    """The problem part of one pydantic error: a validator's own message, or the type's in our words."""
    kind = err["type"].replace("_parsing", "_type").replace("int_from_float", "int_type")
    if kind in ("value_error", "assertion_error"):
        return str(err["ctx"]["error"])
    text = PROBLEMS[kind].format(**err.get("ctx", {})) if kind in PROBLEMS else err["msg"]
    shown = repr(err["input"])
    return text if kind in FIRST + ("missing",) else f"{text}, got {shown if len(shown) <= 60 else shown[:57] + '...'}"


def dotted(loc: tuple, root: str = "") -> str:
    """``('shapes', 0, 'N')`` -> ``shapes[0].N`` below ``root``; a key not a name is quoted (``shapes['8,6']``)."""
    if loc and loc[-1] == "[key]":
        return f"{dotted(loc[:-2], root)} key {loc[-2]!r}"
    for part in loc:
        if isinstance(part, str) and part.isidentifier():
            root += f".{part}" if root else part
        else:
            root += (f"[{part}]" if isinstance(part, int) else f"[{part!r}]") if root else str(part)
    return root


def validate(kind: Any, raw: Any, where: str = "", rename: dict[str, str] | None = None,
             strict: bool | None = None) -> Any:
    """``raw`` as ``kind`` (a :class:`Config` model, or any type named below ``where``: ``--tokens[1]``), else a
    :class:`FieldError` naming the first bad field (an unknown key first); ``rename``: top-level field -> flag."""
    model = isinstance(kind, type) and issubclass(kind, BaseModel)
    try:
        return (kind.model_validate if model else TypeAdapter(kind).validate_python)(raw, strict=strict)
    except ValidationError as exc:
        errs = exc.errors(include_url=False)
        err = next((e for e in errs if e["type"] in FIRST), errs[0])
        loc = tuple((rename or {}).get(p, p) if i == 0 else p for i, p in enumerate(err["loc"]))
        raise FieldError(f"{dotted(loc, '' if model else where) or where}: {problem(err)}") from None


def integer(v: Any, where: str, lo: int | None = None, hi: int | None = None) -> int:
    """``v`` as an int within ``[lo, hi]`` (a bool is not an int)."""
    return validate(Annotated[int, Field(ge=lo, le=hi, strict=True)], v, where)


def fail(loc: tuple, message: str) -> NoReturn:
    """Raise, from inside a validator, an error at ``loc`` below the field being validated."""
    raise ValidationError.from_exception_data("config", [{"type": "value_error", "loc": loc, "input": None,
                                                          "ctx": {"error": message}}])


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping holding a key twice is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        keys = [(k, self.construct_object(k, deep=True)) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]
        for i, (k, key) in enumerate(keys):
            if any(key == other for _, other in keys[:i]):
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}; keep one", k.start_mark)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> Any:
    """The YAML document in ``path``, else a :class:`FieldError` saying why (the caller names the path)."""
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except OSError as exc:
        raise FieldError(f"cannot read: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:
        raise FieldError("cannot read as UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)  # one line: str(exc) spans several, with a source excerpt
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise FieldError(f"malformed YAML{where}: {getattr(exc, 'problem', None) or type(exc).__name__}") from None
