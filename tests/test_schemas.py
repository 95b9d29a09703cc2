"""Model schemas: every parameter of both pages, validation that reports every problem at
once, CSV-style coercion, and a third model added as data only."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from batcher.errors import UsageError
from batcher.schemas import get_model, registry, validate

IID = {"face_image": "https://x/f.jpg", "prompt": "p"}


def test_both_models_carry_every_parameter_of_their_pages() -> None:
    iid, iy = get_model("instantid"), get_model("infinite-you")
    assert set(iid.params) == {
        "face_image", "prompt", "adapter_strength", "base64", "enhance_face_region",
        "guidance_scale", "identity_strength", "negative_prompt", "num_inference_steps",
        "pose_image", "samples", "seed", "style"}  # fmt: skip
    assert set(iy.params) == {
        "id_image", "control_image", "enable_anti_blur", "enable_realism", "guidance_scale",
        "height", "infusenet_conditioning_scale", "infusenet_guidance_end",
        "infusenet_guidance_start", "model_version", "num_steps", "output_format",
        "output_quality", "prompt", "seed", "width"}  # fmt: skip
    assert iid.image_params == ("face_image", "pose_image")
    assert iy.image_params == ("id_image", "control_image")
    assert iid.required_params == ("face_image", "prompt")
    assert iy.required_params == ("id_image",)
    gs = iid.params["guidance_scale"]
    assert (gs.type, gs.default, gs.minimum, gs.maximum) == ("number", 5, 1, 25)
    assert iy.params["output_format"].enum == ("png", "jpg", "webp")
    assert len(iid.params["style"].enum or ()) == 29


def test_every_problem_is_reported_at_once_naming_param_value_and_rule() -> None:
    result = validate(get_model("instantid"), {
        "prompt": "p", "guidance_scale": 99, "samples": "0", "seeed": "1",
        "enhance_face_region": "maybe"})  # fmt: skip
    messages = [str(p) for p in result.errors]
    assert "guidance_scale=99 is above the maximum 25" in messages
    assert "samples=0 is below the minimum 1" in messages
    assert 'seeed=1 is not a parameter of instantid (did you mean "seed"?)' in messages
    assert any(m.startswith("enhance_face_region=maybe is not a boolean") for m in messages)
    assert "face_image is missing: a value is required" in messages
    assert len(messages) == 5
    assert not result.ok


def test_csv_cells_are_coerced_and_empty_cells_mean_not_given() -> None:
    result = validate(get_model("instantid"), {
        **IID, "adapter_strength": "0.8", "enhance_face_region": "true", "samples": "2.0",
        "seed": " 42 ", "negative_prompt": ""})  # fmt: skip
    assert result.ok, result.message()
    assert result.params == {**IID, "adapter_strength": 0.8, "enhance_face_region": True,
                             "samples": 2, "seed": 42}  # fmt: skip
    bad = validate(
        get_model("instantid"),
        {**IID, "num_inference_steps": "ten", "guidance_scale": "nan", "samples": "1.5"},
    )
    assert [str(p) for p in bad.errors] == [
        "num_inference_steps=ten is not an integer",
        "guidance_scale=nan is not a number",
        "samples=1.5 is not an integer",
    ]


def test_a_number_is_written_in_ascii_digits_as_a_manifest_writes_it() -> None:
    """int() and float() also read "1_0" as 10 and other scripts' digits: a typo there
    was sent as another value."""
    good = validate(
        get_model("instantid"),
        {
            **IID,
            "seed": "+7",
            "samples": "1e0",
            "guidance_scale": "7.5e0",
            "adapter_strength": ".5",
        },
    )
    assert good.ok, good.message()
    wanted = {"seed": 7, "samples": 1, "guidance_scale": 7.5, "adapter_strength": 0.5}
    assert {k: good.params[k] for k in wanted} == wanted
    bad = validate(
        get_model("instantid"),
        {
            **IID,
            "seed": "1_0",
            "samples": "\u0663",
            "guidance_scale": "\uff15",
            "num_inference_steps": "2 0",
        },
    )
    assert [str(p) for p in bad.errors] == [
        "seed=1_0 is not an integer",
        "samples=\u0663 is not an integer",
        "guidance_scale=\uff15 is not a number",
        "num_inference_steps=2 0 is not an integer",
    ]


def test_unknown_style_warns_but_unknown_strict_enum_is_an_error() -> None:
    style = validate(get_model("instantid"), {**IID, "style": "Neonn"})
    assert style.ok
    assert style.params["style"] == "Neonn"
    assert 'did you mean "Neon"?' in str(style.warnings[0])
    fmt = validate(get_model("infinite-you"), {"id_image": "https://x", "output_format": "gif"})
    assert [str(p) for p in fmt.errors] == [
        "output_format=gif is not one of the allowed values (png, jpg, webp)"
    ]


def test_nullable_seed_and_unknown_model() -> None:
    assert validate(get_model("infinite-you"), {"id_image": "https://x", "seed": None}).ok
    with pytest.raises(UsageError, match=r'did you mean "instantid"\?'):
        get_model("instantd")


def test_a_third_model_is_a_data_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = {"slug": "toy-model", "title": "Toy", "latency": {"median_s": 3, "sigma": 0.2},
            "cost_usd": 0.01, "output": {"default_format": "jpg"},
            "params": {"prompt": {"type": "string", "required": True},
                       "steps": {"type": "integer", "default": 8, "minimum": 1, "maximum": 50},
                       "image": {"type": "image"}}}  # fmt: skip
    (tmp_path / "toy-model.json").write_text(json.dumps(spec))
    monkeypatch.setenv("BATCHER_MODEL_DIRS", str(tmp_path))
    assert "toy-model" in registry()
    toy = get_model("toy-model")
    assert toy.image_params == ("image",)
    assert toy.median_latency_s == 3
    assert [str(p) for p in validate(toy, {"prompt": "x", "steps": "60"}).errors] == [
        "steps=60 is above the maximum 50"
    ]


def test_a_value_of_a_type_no_parameter_takes_is_named_once_with_what_is_expected() -> None:
    """Before: "prompt={'x': 1} is not a string; prompt={'x': 1} is required" (the second
    part wrong: it was given), and a date shown as datetime.date(1970, 1, 2)."""
    result = validate(get_model("instantid"), {
        "face_image": "https://x/f.jpg", "prompt": {"x": 1}, "negative_prompt": ["a", "b"],
        "seed": datetime.datetime(1970, 1, 1, 0, 0, 1), "guidance_scale": datetime.date(1970, 1, 2),
        "base64": datetime.timedelta(seconds=1)})  # fmt: skip
    assert [str(p) for p in result.errors] == [
        "prompt={'x': 1} is an object, not a string",
        "negative_prompt=['a', 'b'] is a list, not a string",
        "seed=1970-01-01 00:00:01 is a timestamp, not an integer",
        "guidance_scale=1970-01-02 is a date, not a number",
        "base64=datetime.timedelta(seconds=1) is a duration, not a boolean",
    ]


def test_binary_data_for_an_image_asks_for_text_and_shows_no_bytes() -> None:
    """Before: face_image=b"\\x89PNG\\r\\n\\x1a\\n..." is not a string; ... is required."""
    png = b"\x89PNG\r\n\x1a\n" + bytes(100)
    result = validate(get_model("instantid"), {"prompt": "p", "face_image": png})
    assert [str(p) for p in result.errors] == [
        "face_image is binary data (108 bytes): give base64 text, a URL or a file path"
    ]
    listed = validate(get_model("infinite-you"), {"id_image": ["https://x/y.jpg"]})
    assert [str(p) for p in listed.errors] == [
        "id_image=['https://x/y.jpg'] is a list: give base64 text, a URL or a file path"
    ]


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ({}, "prompt is missing: a value is required"),
        ({"prompt": None}, "prompt is null: a value is required"),
        ({"prompt": ""}, "prompt is empty: a value is required"),
        ({"prompt": float("nan")}, "prompt is NaN: a value is required"),
        ({"prompt": " \t"}, "prompt=' \\t' is only whitespace: a value is required"),
        ({"blanks": {"prompt": None}}, "prompt is null: a value is required"),
        ({"blanks": {"prompt": ""}}, "prompt is empty: a value is required"),
    ],
    ids=["absent", "null", "empty", "nan", "whitespace", "blank-null", "blank-empty"],
)
def test_a_required_value_not_given_says_what_stood_in_its_place(
    given: dict[str, object], says: str
) -> None:
    """Before: prompt='' is required, whether the cell was null, empty or missing."""
    blanks = given.pop("blanks", None)
    assert isinstance(blanks, dict | None)
    result = validate(
        get_model("instantid"), {"face_image": "https://x/f.jpg", **given}, blanks=blanks
    )
    assert [str(p) for p in result.errors] == [says]


def test_a_number_where_a_style_name_goes_warns_saying_so() -> None:
    """Before: style=3 is not one of the allowed values (...); sent anyway."""
    number = validate(get_model("instantid"), {**IID, "style": 3})
    assert number.ok
    assert number.params["style"] == "3"
    assert [str(w) for w in number.warnings] == [
        "style=3 is a number where a name is expected (one of (No style), Watercolor, Film "
        'Noir, Neon, Jungle, Mars, ...); sent anyway as "3", the server decides'
    ]
    text = validate(get_model("instantid"), {**IID, "style": "3"})  # a CSV cell
    assert [str(w) for w in text.warnings] == [
        "style=3 is a number where a name is expected (one of (No style), Watercolor, Film "
        "Noir, Neon, Jungle, Mars, ...); sent anyway, the server decides"
    ]
    strict = validate(get_model("infinite-you"), {"id_image": "https://x", "output_format": 1})
    assert [str(p) for p in strict.errors] == [
        "output_format=1 is a number where a name is expected (one of png, jpg, webp)"
    ]


def test_spaces_around_a_name_from_a_list_are_not_part_of_it() -> None:
    """A hand-written CSV puts a space after its commas. Numbers and booleans were read
    stripped, names were not: output_format=" png" was refused although the page lists
    "png", and style=" Watercolor" was sent with its space, as a style the page lacks."""
    iy = validate(
        get_model("infinite-you"),
        {"id_image": "https://x", "output_format": " png", "model_version": "sim_stage1 "},
    )
    assert iy.ok, iy.message()
    assert (iy.params["output_format"], iy.params["model_version"]) == ("png", "sim_stage1")
    iid = validate(get_model("instantid"), {**IID, "style": " Watercolor", "prompt": " p "})
    assert (iid.params["style"], iid.warnings) == ("Watercolor", ())
    assert iid.params["prompt"] == " p "  # free text is sent as written
    unlisted = validate(get_model("instantid"), {**IID, "style": "Watercolour "})
    assert unlisted.params["style"] == "Watercolour"
    assert str(unlisted.warnings[0]).endswith('sent anyway as "Watercolour", the server decides')


def test_a_boolean_written_as_a_whole_number_reads_like_an_integer_does() -> None:
    """An integer column with a gap is float in pandas (1.0), so Parquet holds 1.0 and
    CSV "1.0"; samples=2.0 was read as 2, but enhance_face_region=1.0 was refused."""
    given = {"enhance_face_region": 1.0, "base64": "0.0"}
    result = validate(get_model("instantid"), {**IID, **given})
    assert result.ok, result.message()
    assert (result.params["enhance_face_region"], result.params["base64"]) == (True, False)
    iy = validate(get_model("infinite-you"), {"id_image": "https://x", "enable_realism": "1.0"})
    assert iy.params["enable_realism"] is True
    bad = validate(get_model("instantid"), {**IID, "base64": 0.5, "enhance_face_region": "2"})
    assert [str(p) for p in bad.errors] == [
        "base64=0.5 is not a boolean (use true or false)",
        "enhance_face_region=2 is not a boolean (use true or false)",
    ]
