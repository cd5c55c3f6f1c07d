"""Every number every command takes is checked at the door: the options are enumerated from the commands'
own Typer definitions (and the data module's __init__), so a new option cannot escape; each is fed NaN,
infinity, -1 and its bounds' neighbours, and must end in one `error:` line naming it and exit status 2."""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing

import pytest
import typer

from fact_lightning.checks import Range
from fact_lightning.commands.cli_errors import run_app
from tests.inference.cli_runner import assert_one_error, error_lines, run_cli


pytestmark = pytest.mark.timeout(120)


def _apps() -> dict[str, typer.Typer]:
    from data_tools.cli import app as data_app
    from fact_lightning.evaluation.cli import app as evaluate_app
    from fact_lightning.inference.cli import app as generate_app

    return {"fact-data": data_app, "fact-generate": generate_app, "fact-evaluate": evaluate_app}


def _leaf(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Annotated:
        return _leaf(args[0])
    return _leaf(args[0]) if len(args) == 1 else annotation


def _info(param: inspect.Parameter, hint):
    found = [m for m in getattr(hint, "__metadata__", ()) if isinstance(m, typer.models.ParameterInfo)]
    return found[0] if found else param.default if isinstance(param.default, typer.models.ParameterInfo) else None


def commands():
    """(script, [subcommand], callback) for every command of every Typer app."""
    for script, app in _apps().items():
        for registered in app.registered_commands:
            sub = [registered.name or registered.callback.__name__] if script == "fact-data" else []
            yield script, sub, registered.callback


def options():
    """(script, subcommand argv, every parameter (name, info, leaf type), this numeric option, its range)."""
    for script, sub, callback in commands():
        hints = typing.get_type_hints(callback, include_extras=True)
        params = [(name, _info(p, hints[name]), _leaf(hints[name]), _required(p))
                  for name, p in inspect.signature(callback).parameters.items()]
        for name, info, leaf, _ in params:
            if leaf in (int, float):
                yield script, sub, params, name, info


def _required(param: inspect.Parameter) -> bool:
    if isinstance(param.default, typer.models.ParameterInfo):  # name: T = typer.Option(default, ...)
        return param.default.default is ...
    return param.default is inspect.Parameter.empty  # name: Annotated[T, typer.Option(...)] = default


def _flag(name: str, info) -> str:
    decls = [d for d in (info.param_decls or ()) if d.startswith("--")] if info else []
    return decls[0] if decls else "--" + name.replace("_", "-")


def _required_args(params, skip: str) -> list[str]:
    """Dummy values for the required parameters (paths that do not exist: nothing heavy can run)."""
    argv = []
    for name, info, _, required in params:
        if name == skip or info is None:
            continue
        if required:
            value = "/nonexistent/x"
            argv += [value] if isinstance(info, typer.models.ArgumentInfo) else [_flag(name, info), value]
    return argv


def _bad_values(range_: Range) -> list[str]:
    values = ["nan", "inf", "-inf", "-1", "1e999"]
    if range_.min is not None:
        values.append(repr(range_.min) if range_.min_open else repr(range_.min - (1 if range_.kind is int else 0.5)))
    if range_.max is not None:
        values.append(repr(range_.max + 1))
    if range_.kind is int:
        values += ["1.5", "abc"]
    return [v for v in values if _refused(range_, v)]


def _refused(range_: Range, text: str) -> bool:
    try:
        range_(text)
    except ValueError:
        return True
    return False


ALL = list(options())


def test_every_numeric_option_declares_a_range():
    assert len(ALL) >= 30, [o[3] for o in ALL]  # generate, evaluate and every fact-data command are seen
    for script, sub, _, name, info in ALL:
        assert info is not None and isinstance(info.parser, Range), f"{script} {sub} --{name} parses unchecked"
        assert _refused(info.parser, "nan") and _refused(info.parser, "inf"), name


@pytest.mark.timeout(120)
@pytest.mark.parametrize("script,sub,params,name,info", ALL, ids=[f"{o[0]}{''.join(' ' + s for s in o[1])} {o[3]}"
                                                                    for o in ALL])
def test_each_option_refuses_nan_inf_negatives_and_out_of_range(capsys, script, sub, params, name, info):
    """In process, through the same runner as the console scripts (run_app): parsing refuses before any work."""
    flag = _flag(name, info)
    bad = _bad_values(info.parser)
    assert {"nan", "inf", "-1"} <= set(bad), (flag, info.parser)  # no option takes -1: counts and scales are >= 0
    app = _apps()[script]
    for value in bad:
        status = run_app(app, [*sub, *_required_args(params, name), f"{flag}={value}"])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert status == 2 and len(lines) == 1, (flag, value, err)
        assert flag in lines[0] and "must be" in lines[0], (flag, value, lines[0])
        assert "Traceback" not in err


@pytest.mark.timeout(180)
@pytest.mark.parametrize("argv,option", [
    (["fact-generate", "--tiny", "--prompt", "a", "--reference", "x.jpg", "--out", "OUT", "--adapter-scale", "nan"],
     "--adapter-scale"),
    (["fact-generate", "--tiny", "--prompt", "a", "--reference", "x.jpg", "--out", "OUT", "--seed", "99999999999999999999"],
     "--seed"),
    (["fact-evaluate", "--tiny", "--prompt", "a", "--identities", "x", "--out", "OUT", "--guidance-scale", "inf"],
     "--guidance-scale"),
    (["fact-data", "build", "--src", "x", "--out", "OUT", "--images-per-shard", "0"], "--images-per-shard"),
    (["fact-data", "build", "--src", "x", "--out", "OUT", "--resolution", "nan"], "--resolution"),
    (["fact-data", "preview", "x", "--out", "OUT", "--columns", "-2"], "--columns"),
])
def test_console_scripts_refuse_in_one_line(tmp_path, argv, option):
    """The installed entry points go through the same runner: one line, exit 2, nothing written."""
    out = tmp_path / "o"
    result = run_cli(argv[0], *[str(out) if a == "OUT" else a for a in argv[1:]], timeout=150)
    assert_one_error(result, option, "must be")
    assert not out.exists()


def test_python_callers_meet_the_same_ranges(tmp_path):
    """Dataclasses built in Python (no parser in between) check the same ranges."""
    from data_tools.options import BuildOptions, LatentOptions
    from data_tools.records import RecordOptions
    from fact_lightning.commands.options import SamplingOptions

    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of {subject}\n")
    with pytest.raises(ValueError, match="--guidance-scale must be"):
        SamplingOptions(prompts=prompts, guidance_scale=math.inf)
    with pytest.raises(ValueError, match="--seed must be"):
        SamplingOptions(prompts=prompts, seed=[0, -5])
    with pytest.raises(ValueError, match="--face-fraction must be"):
        RecordOptions(face_fraction=math.nan)
    with pytest.raises(ValueError, match="--workers must be"):
        BuildOptions(src=tmp_path, out=tmp_path / "o", workers=-2)
    with pytest.raises(ValueError, match="--vae-batch-size must be"):
        LatentOptions(vae_batch_size=0)
    with pytest.raises(ValueError, match="the seed of --vae tiny:"):
        LatentOptions(vae="tiny:99999999999999999999999")


@dataclasses.dataclass(kw_only=True)
class _Loose:
    x: typing.Annotated[float, typer.Option(help="no range")] = 1.0


def _loose_command(opts: _Loose) -> None: ...


def test_a_numeric_field_without_a_range_cannot_become_an_option():
    from data_tools.cli import _option_parameters
    from data_tools.declare import option
    from fact_lightning.commands.options import command

    @dataclasses.dataclass
    class Loose:
        n: int = option(3, "no range")

    with pytest.raises(TypeError, match="'n' of Loose has no range"):
        _option_parameters(Loose)
    with pytest.raises(TypeError, match="'x' of _Loose has no range"):
        command(_loose_command)


def test_the_data_module_checks_every_numeric_argument():
    """fact-train's data arguments (data.*): every int or float __init__ argument has a range and refuses NaN,
    infinity and -1 by name."""
    from fact_lightning.data.datamodule import _RANGES, FactDataModule

    hints = typing.get_type_hints(FactDataModule.__init__)
    numeric = {name for name, hint in hints.items() if _leaf(hint) in (int, float)}
    assert numeric == set(_RANGES)
    for name in sorted(numeric):
        for value in (math.nan, math.inf, -1):
            with pytest.raises(ValueError, match=f"data.{name} must be"):
                FactDataModule("unused", **{name: value})


def test_templates_with_an_unknown_placeholder_are_refused(tmp_path):
    from data_tools.options import BuildOptions
    from fact_lightning.commands.options import SamplingOptions

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# fine\na photo of {subject}\na photo of {subjet} at night\n")
    with pytest.raises(ValueError, match=r"prompts.txt:3: unknown placeholder \{subjet\}"):
        SamplingOptions(prompts=prompts).prompt_list()
    for bad in ("a {0}", "a {subject.__class__}", "a { lone", "a photo of {}"):
        with pytest.raises(ValueError, match="--prompt"):
            SamplingOptions(prompt=[bad])
    assert SamplingOptions(prompt=["{{braces}} and {subject}"], subject="me").prompt_list() == ["{braces} and me"]
    for bad in ("photo of {name}", "photo of {identity", "{identity!z}x{0}"):
        with pytest.raises(ValueError, match="--caption-template"):
            BuildOptions(src=tmp_path, out=tmp_path / "o", caption_template=bad)


@pytest.mark.timeout(180)
def test_a_bad_prompt_file_is_one_line_naming_it_and_writes_nothing(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {subject}\na photo of {person}\n")
    out = tmp_path / "out"
    result = run_cli("fact-evaluate", "--tiny", "--identities", tmp_path, "--prompts", prompts, "--out", out,
                     timeout=150)
    line = assert_one_error(result, f"{prompts}:2", "{person}")
    assert error_lines(result) == [line] and not out.exists()
