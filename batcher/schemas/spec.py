"""Model and parameter specifications, loaded from the JSON files beside this module.

A model is data: adding a Segmind model means adding one ``<slug>.json`` here (or in
a folder named by ``BATCHER_MODEL_DIRS``), not writing code.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import Any, Literal

from batcher.errors import SchemaError, UsageError

ParamType = Literal["string", "integer", "number", "boolean", "image"]
_TYPES: frozenset[str] = frozenset({"string", "integer", "number", "boolean", "image"})


@dataclass(frozen=True, kw_only=True)
class ParamSpec:
    """One parameter of a model's API: its type and the rules a value must keep."""

    name: str
    type: ParamType
    required: bool = False
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    enum: tuple[str, ...] | None = None
    #: False where the server, not the page, is the authority: an unlisted value warns.
    enum_strict: bool = True
    nullable: bool = False
    description: str = ""

    @property
    def is_image(self) -> bool:
        return self.type == "image"


@dataclass(frozen=True, kw_only=True)
class OutputSpec:
    """How a model's output image is shaped, and which parameters shape it."""

    default_format: str = "png"
    default_width: int = 1024
    default_height: int = 1024
    format_param: str | None = None
    width_param: str | None = None
    height_param: str | None = None
    quality_param: str | None = None
    samples_param: str | None = None
    base64_param: str | None = None


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A Segmind model: its slug, parameters, typical latency and output shape."""

    slug: str
    title: str
    params: Mapping[str, ParamSpec]
    median_latency_s: float
    latency_sigma: float
    cost_usd: float
    output: OutputSpec = field(default_factory=OutputSpec)

    @cached_property  # asked once per job sent
    def image_params(self) -> tuple[str, ...]:
        return tuple(name for name, p in self.params.items() if p.is_image)

    @property
    def seed_when_absent(self) -> int | None:
        """The seed the server draws a job's image with when the job gives none: -1 when
        that is a random one (the pages' -1, or null, "for randomness"), None when the
        model takes no ``seed``. A seed >= 0 makes the image a function of the
        parameters: two jobs alike in them are billed twice for one image."""
        spec = self.params.get("seed")
        if spec is None:
            return None
        default = spec.default
        return default if isinstance(default, int) and default >= 0 else -1

    @property
    def required_params(self) -> tuple[str, ...]:
        return tuple(name for name, p in self.params.items() if p.required)

    def with_defaults(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The parameters as the server would see them: given values over the defaults."""
        resolved = {n: p.default for n, p in self.params.items() if p.default is not None}
        resolved.update(params)
        return resolved


def _param_from_json(name: str, raw: Mapping[str, Any], where: str) -> ParamSpec:
    ptype = raw.get("type")
    if ptype not in _TYPES:
        raise SchemaError(f"{where}: parameter {name!r} has unknown type {ptype!r}")
    enum = raw.get("enum")
    return ParamSpec(
        name=name,
        type=ptype,
        required=bool(raw.get("required", False)),
        default=raw.get("default"),
        minimum=raw.get("minimum"),
        maximum=raw.get("maximum"),
        enum=tuple(enum) if enum is not None else None,
        enum_strict=bool(raw.get("enum_strict", True)),
        nullable=bool(raw.get("nullable", False)),
        description=str(raw.get("description", "")),
    )


def model_from_json(raw: Mapping[str, Any], where: str = "<model>") -> ModelSpec:
    """Build a :class:`ModelSpec` from the parsed JSON of one model file."""
    try:
        slug = str(raw["slug"])
        params = {n: _param_from_json(n, p, where) for n, p in raw["params"].items()}
        latency = raw.get("latency", {})
        out = {k: v for k, v in raw.get("output", {}).items() if not k.startswith("_")}
        return ModelSpec(
            slug=slug,
            title=str(raw.get("title", slug)),
            params=params,
            median_latency_s=float(latency.get("median_s", 10.0)),
            latency_sigma=float(latency.get("sigma", 0.3)),
            cost_usd=float(raw.get("cost_usd", 0.0)),
            output=OutputSpec(**out),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SchemaError(f"{where}: malformed model file ({exc})") from None


@cache
def _model_dirs(extra: str) -> tuple[Path, ...]:
    """The built-in folder, then each folder of ``BATCHER_MODEL_DIRS`` (``extra``)."""
    return (Path(__file__).parent, *(Path(d) for d in extra.split(os.pathsep) if d))


def _models() -> dict[str, ModelSpec]:
    """The registry for the current ``BATCHER_MODEL_DIRS`` (read once per value)."""
    return _registry(_model_dirs(os.environ.get("BATCHER_MODEL_DIRS", "")))


@cache
def _registry(dirs: tuple[Path, ...]) -> dict[str, ModelSpec]:
    models: dict[str, ModelSpec] = {}
    for d in dirs:
        for path in sorted(d.glob("*.json")):
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise SchemaError(f"{path}: cannot read model file ({exc})") from None
            spec = model_from_json(raw, str(path))
            models[spec.slug] = spec
    return models


def registry() -> dict[str, ModelSpec]:
    """Every known model by slug."""
    return dict(_models())


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean "x"?)' for the closest choice, or '' when none is close (a choice
    that differs only in case is the closest)."""
    choices = list(choices)
    close = [c for c in choices if c.lower() == word.lower()]
    close = close or difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def get_model(slug: str) -> ModelSpec:
    """The model for a slug, or a :class:`UsageError` naming the known ones."""
    models = _models()
    try:
        return models[slug]
    except KeyError:
        known = ", ".join(sorted(models))
        raise UsageError(
            f"unknown model {slug!r}{did_you_mean(slug, models)}; known models: {known}"
        ) from None
