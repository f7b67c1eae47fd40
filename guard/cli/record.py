"""`Record`: immutable named values for the CLI's session path, declared like frozen
dataclasses (annotated fields, defaults as class attributes) but built without importing
`dataclasses` or `typing`.

Why: `guard exec` must start fast (issue 13), and on this 2-core machine importing
`dataclasses` (which imports `inspect`, `ast`, `dis`, `tokenize`, `re`) and `typing` costs
~80 M instructions, a quarter of what the whole command used to execute. A record's
`__init__` is one generic function instead of code generated per class; mypy still checks
every constructor call against the fields (PEP 681 `dataclass_transform`).

Imports nothing at run time.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from typing import Any, ClassVar, Self, dataclass_transform
else:

    def dataclass_transform(**_: object) -> object:
        return lambda cls: cls


@dataclass_transform(frozen_default=True)
class Record:
    """A value with named fields: positional or keyword construction with defaults,
    equality and hashing by value, a repr, `as_dict()`, `replace()`; assigning a field
    after construction raises AttributeError. Subclasses declare fields as annotations (a
    default is a class attribute) and may override `__repr__` (to hide secrets)."""

    _fields: ClassVar[tuple[str, ...]] = ()
    _defaults: ClassVar[dict[str, object]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        own = tuple(cls.__dict__.get("__annotations__", {}))
        cls._fields = (*cls._fields, *(n for n in own if n not in cls._fields))
        cls._defaults = {
            **cls._defaults,
            **{name: cls.__dict__[name] for name in own if name in cls.__dict__},
        }
        required = [n for n in cls._fields if n not in cls._defaults]
        if cls._fields[: len(required)] != tuple(required):
            raise TypeError(f"{cls.__name__}: a field without a default follows one with")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = type(self)._fields
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes {len(names)} fields, got {len(args)}")
        values = dict(zip(names, args, strict=False))
        for name, value in kwargs.items():
            if name not in names or name in values:
                raise TypeError(f"{type(self).__name__}: unexpected or repeated field {name!r}")
            values[name] = value
        defaults = type(self)._defaults
        for name in names:
            if name in values:
                value = values[name]
            elif name in defaults:
                value = defaults[name]
            else:
                raise TypeError(f"{type(self).__name__}: missing field {name!r}")
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._fields}

    def replace(self, **changes: Any) -> Self:
        return type(self)(**{**self.as_dict(), **changes})

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash((type(self), *self.as_dict().values()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({fields})"
