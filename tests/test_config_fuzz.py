"""Every config field is typed and range-checked in one place: random valid and invalid values, given through
YAML and the command line, either make a config or raise one UserError naming each bad field, nothing else;
sampled valid configs start training; the values found to slip through end in one line and exit 2."""

import dataclasses
import importlib.util
import math
import tempfile
from pathlib import Path

import pytest
import yaml
from helpers import PYTHON, ROOT, run_cli
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from scan_zoo.common.errors import UserError
from scan_zoo.common.recipes import list_recipes, recipe_path
from scan_zoo.common.validation import (
    INT64_MAX,
    Choice,
    Text,
    field_specs,
    unbounded_fields,
)
from scan_zoo.eval.probe import ProbeConfig
from scan_zoo.train.config import (
    TrainConfig,
    build_config,
    config_from_args,
    load_yaml,
    read_saved_config,
)

SPECS = field_specs(TrainConfig)
FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TEXT = st.text(st.characters(max_codepoint=0x2FF, blacklist_categories=("Cc", "Cs")), max_size=12)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PARSER = load_script("train.py").build_parser()


# ------------------------------------------------------------------------------- values from the bounds
def valid_values(name: str, spec) -> st.SearchStrategy:
    """Values the field's declared type and bound allow (``null`` where Optional)."""
    if name == "model":  # any string is allowed by the type; a known timm name lets the run get further
        base = st.sampled_from(["test_resnet", "resnet18", "vit_tiny_patch16_224"])
    elif spec.base is bool:
        base = st.booleans()
    elif isinstance(spec.bound, Choice):
        base = st.sampled_from(spec.bound.options)
    elif isinstance(spec.bound, Text):
        base = TEXT.filter(lambda s: len(s) >= spec.bound.min_len)
    elif spec.base is int:
        lo, hi = spec.bound.lo, spec.bound.hi
        base = st.integers(
            -INT64_MAX if lo is None else int(lo) + spec.bound.lo_open,
            INT64_MAX if hi is None else int(hi) - spec.bound.hi_open,
        )
    elif spec.base is float:
        b = spec.bound
        base = st.floats(
            b.lo,
            b.hi,
            exclude_min=b.lo_open and b.lo is not None,
            exclude_max=b.hi_open and b.hi is not None,
            allow_nan=False,
            allow_infinity=False,
        )
    else:
        raise AssertionError(f"no strategy for {name}: {spec}")
    return st.none() | base if spec.optional else base


def invalid_values(name: str, spec) -> st.SearchStrategy:
    """Values the field refuses: out of range, of another type, non-finite, null where required."""
    wrong_type = [
        st.lists(st.integers(), max_size=2),
        st.dictionaries(st.sampled_from("ab"), st.integers(), min_size=1),
    ]
    if not spec.optional:
        wrong_type.append(st.none())
    if spec.base is bool:
        cases = [st.sampled_from(["maybe", "2", "yes please"]), st.floats(0.1, 0.9)]
    elif isinstance(spec.bound, Choice):
        cases = [TEXT.filter(lambda s: s not in spec.bound.options), st.floats(allow_nan=False)]
    elif isinstance(spec.bound, Text):
        cases = [st.just("")] if spec.bound.min_len else []
        cases += [st.booleans(), st.floats(allow_nan=False)]
    elif spec.base in (int, float):
        b, cases = (
            spec.bound,
            [st.booleans(), st.sampled_from([math.inf, -math.inf, math.nan]), st.sampled_from(["many", "1,5", "0x10"])],
        )
        if spec.base is int:
            cases += [st.floats(0.1, 1e6).filter(lambda x: not x.is_integer()), st.integers(min_value=2**63)]
        if b.lo is not None:
            lo = st.floats(max_value=b.lo, exclude_max=not b.lo_open, allow_nan=False, allow_infinity=False)
            cases.append(lo.map(int).filter(lambda x: not b.ok(x)) if spec.base is int else lo)
        if b.hi is not None:
            hi = st.floats(min_value=b.hi, exclude_min=not b.hi_open, allow_nan=False, allow_infinity=False)
            cases.append(hi.map(int).filter(lambda x: not b.ok(x)) if spec.base is int else hi)
    else:
        raise AssertionError(f"no strategy for {name}: {spec}")
    return st.one_of(*cases, *wrong_type)


@st.composite
def assignments(draw, max_fields: int = 4):
    """``({field: value}, {fields given an invalid value})`` over a random subset of TrainConfig's fields."""
    names = draw(st.lists(st.sampled_from(sorted(SPECS)), min_size=1, max_size=max_fields, unique=True))
    values, bad = {}, set()
    for name in names:
        if draw(st.booleans()):
            values[name] = draw(invalid_values(name, SPECS[name]))
            bad.add(name)
        else:
            values[name] = draw(valid_values(name, SPECS[name]))
    return values, bad


def as_cli(name: str, value) -> str:
    """One ``--flag=value`` word, the value spelled as a user would type it."""
    text = {True: "true", False: "false"}.get(value, value) if isinstance(value, bool) else value
    return f"--{name.replace('_', '-')}={text}"


def still_bad_as_text(name: str, value) -> bool:
    """On the command line every value is text: a number given to a text field is then a valid string."""
    spec = SPECS[name]
    if spec.base is not str or isinstance(value, str):
        return True
    return isinstance(spec.bound, Choice) and as_cli(name, value).split("=", 1)[1] not in spec.bound.options


def check_outcome(make, values: dict, bad: set) -> None:
    """``make()`` returns a config holding ``values`` (when all are valid) or raises a UserError naming
    every bad field; any other exception fails the test by propagating."""
    try:
        cfg = make()
    except UserError as e:
        message = str(e)
        assert "\n" not in message
        for name in bad:
            assert name in message, (name, message)
        if not bad:  # refused although every value is in range: only a check that spans fields may do that
            assert "bad value" not in message, message
        return
    assert not bad, f"accepted invalid {bad}: {values}"
    for name, value in values.items():
        got = getattr(cfg, name)
        if value is not None and SPECS[name].base is float:
            assert got == pytest.approx(float(value), rel=1e-12)
        elif SPECS[name].base is not bool and value is not None:
            assert got == value, (name, got, value)


# ------------------------------------------------------------------------------------------ the tests
def test_every_field_declares_its_type_and_range():
    """A field added without a bound fails here: declare one (Range, Choice, Text) in its annotation."""
    assert unbounded_fields(TrainConfig) == []
    assert unbounded_fields(ProbeConfig) == []
    for name, spec in SPECS.items():
        valid_values(name, spec), invalid_values(name, spec)  # every spec has strategies: the fuzz covers it


@pytest.mark.parametrize("recipe", list_recipes())
def test_shipped_recipes_validate(recipe):
    build_config(load_yaml(recipe_path(recipe)))


@FAST
@given(assignments())
def test_yaml_values_make_a_config_or_one_user_error(case):
    values, bad = case
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "recipe.yaml"
        path.write_text(yaml.safe_dump(values, allow_unicode=True))
        check_outcome(lambda: build_config(load_yaml(path)), yaml.safe_load(path.read_text()), bad)


@FAST
@given(assignments())
def test_command_line_values_make_a_config_or_one_user_error(case):
    values, bad = case
    cli = {k: v for k, v in values.items() if v is not None and not isinstance(v, (list, dict))}
    bad = {k for k in bad & set(cli) if still_bad_as_text(k, cli[k])}
    args = PARSER.parse_args([as_cli(k, v) for k, v in cli.items()])
    typed = {k: (as_cli(k, v).split("=", 1)[1] if SPECS[k].base is str else v) for k, v in cli.items()}
    check_outcome(lambda: config_from_args(args), typed, bad)


@FAST
@given(assignments())
def test_a_saved_config_is_checked_as_strictly(case):
    """A run's config.yaml, edited by hand or from elsewhere: read for resume or export, it is checked too."""
    values, bad = case
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.yaml"
        path.write_text(yaml.safe_dump({**TrainConfig().to_dict(), **values}, allow_unicode=True))
        check_outcome(lambda: read_saved_config(path), yaml.safe_load(path.read_text()), bad)


@st.composite
def cheap_valid_configs(draw):
    """Valid values for every field, the sizes kept small enough that a step takes a moment."""
    small = {
        "epochs": st.integers(1, 3),
        "batch_size": st.integers(2, 8),
        "queue_size": st.integers(1, 40),
        "proj_dim": st.integers(1, 16),
        "image_size": st.integers(2, 24),
        "k": st.integers(-1, 3),
        "dsc_dense_dim": st.integers(1, 16),
        "dsc_queue_size": st.none() | st.integers(1, 40),
        "dsc_topk": st.integers(1, 4),
        "dsc_clusters": st.integers(2, 6),
        "dsc_kmeans_iters": st.integers(1, 3),
        "dsc_sinkhorn_iters": st.integers(1, 3),
        "dsc_pixel_samples": st.integers(1, 64),
        "dsc_feature_layer": st.none() | st.integers(-5, 5),
        "key_bn_splits": st.integers(1, 9),
        "knn_k": st.integers(1, 50),
        "lr": st.floats(1e-4, 1.0),
        "temperature": st.floats(0.05, 5.0),
        "dsc_sinkhorn_eps": st.floats(0.01, 1.0),
        "warmup_epochs": st.floats(0, 2),
        "eval_resize": st.none() | st.integers(24, 40),
    }
    fixed = {
        "method": st.sampled_from(["moco", "supcon", "supervised", "dsc"]),
        "model": st.just("test_resnet"),
        "max_steps": st.just(1),
        "num_workers": st.just(0),
        "decode": st.just("cpu"),
        "resume": st.none(),
        "neighbors": st.none(),
        "appearance_model": st.none(),
        "init_from": st.none(),
        "data": st.none(),
        "data_cache": st.none(),
        "output_dir": st.none(),
        "deterministic": st.just(False),
        "stop_after_steps": st.none(),
        "save_every_steps": st.none(),
        "time_limit": st.none(),
    }  # a limit already spent would stop the run before its step, by design
    values = {}
    for name, spec in SPECS.items():
        strategy = fixed[name] if name in fixed else small[name] if name in small else valid_values(name, spec)
        values[name] = draw(strategy)
    return {k: v for k, v in values.items() if v is not None or SPECS[k].optional}


@settings(
    max_examples=3,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(cheap_valid_configs())
def test_valid_configs_start_training_or_refuse_in_one_line(tiny_data_once, case):
    """The other half: a valid config takes its first step (or meets a check that needs the data, as a
    UserError). One step each, on 48 tiny images."""
    from scan_zoo.experiments.pipeline import run_training

    with tempfile.TemporaryDirectory() as d:
        values = {**case, "data": str(tiny_data_once), "output_dir": str(Path(d) / "run")}
        try:
            cfg = build_config(values)
            summary = run_training(cfg)
        except UserError as e:
            assert "\n" not in str(e) and "bad value" not in str(e), str(e)
            return
        assert summary["steps"] == 1


@pytest.fixture(scope="module")
def tiny_data_once(tmp_path_factory):
    from helpers import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("data"))


# ----------------------------------------------------------------------- the values found to slip through
FOUND_CLI = [
    ["--jitter-hue", "0.9"],
    ["--crop-scale-min", "2"],
    ["--sgd-momentum", "-0.5"],
    ["--weight-decay", "-1"],
    ["--image-size", "1"],
    ["--batch-size", "1"],
    ["--temperature", "inf"],
    ["--eval-resize", "-5"],
]
FOUND_YAML = ["model: null\n", "max_steps: .inf\n", "batch_size: 8.9\n"]


def _found_case(args, tmp_path):
    """(argv for train.py, the field the one line must name); a YAML case's recipe is written to tmp_path."""
    field = args[1].split(":")[0] if args[0] == "--config" else args[0].lstrip("-").replace("-", "_")
    if args[0] == "--config":
        (tmp_path / "r.yaml").write_text(args[1])
        args = ["--config", str(tmp_path / "r.yaml")]
    return [
        "--method",
        "moco",
        "--num-workers",
        "0",
        "--data",
        str(tmp_path / "no-data-needed"),
        "--output-dir",
        str(tmp_path / "run"),
        *args,
    ], field


def _check_one_line(code, stderr, field, run):
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, stderr
    assert lines[0].startswith("train.py: error: bad value") and field in lines[0], lines[0]
    assert not run.exists()


@pytest.mark.parametrize("args", FOUND_CLI + [["--config", y] for y in FOUND_YAML], ids=lambda a: " ".join(a).strip())
def test_found_values_are_one_line_and_exit_2_before_any_work(args, tmp_path, capsys):
    """train.py's main, in this process (each case is parsed and refused before torch does any work)."""
    import train

    argv, field = _found_case(args, tmp_path)
    capsys.readouterr()
    code = train.main(argv)
    _check_one_line(code, capsys.readouterr().err, field, tmp_path / "run")


@pytest.mark.parametrize(
    "args", [["--temperature", "inf"], ["--config", "batch_size: 8.9\n"]], ids=lambda a: " ".join(a).strip()
)
def test_found_values_as_a_user_runs_them(args, tmp_path):
    """The same refusal from the real command in its own process (a command line and a YAML case)."""
    argv, field = _found_case(args, tmp_path)
    p = run_cli([PYTHON, "train.py", *argv], timeout=300)
    _check_one_line(p.returncode, p.stderr, field, tmp_path / "run")


@pytest.mark.parametrize(
    "args",
    [
        ["--eval-resize", "-5"],
        ["--lr", "inf"],
        ["--momentum", "-1"],
        ["--batch-size", "8.9"],
        ["--knn-temperature", "nan"],
        ["--crop-scale-max", "2"],
    ],
    ids=lambda a: " ".join(a),
)
def test_probe_options_are_one_line_and_exit_2(args, tmp_path):
    out = tmp_path / "results.json"
    p = run_cli(
        [
            PYTHON,
            "eval_linear.py",
            "test_resnet",
            "--data",
            str(tmp_path / "absent"),
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
            *args,
        ],
        timeout=120,
    )
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert args[0].lstrip("-").replace("-", "_") in lines[0] and "bad value" in lines[0], lines[0]
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_the_probe_config_checks_types_and_ranges_in_code_too():
    with pytest.raises(UserError, match="eval_resize must be at least 1, not -5"):
        ProbeConfig(eval_resize=-5).validate()
    with pytest.raises(UserError, match="smaller than image_size"):
        ProbeConfig(image_size=32, eval_resize=16).validate()
    with pytest.raises(UserError, match="batch_size expects a int, not 8.9"):
        ProbeConfig(batch_size=8.9).validate()
    assert dataclasses.replace(ProbeConfig(), milestones=(1, 2)).validate().milestones == (1, 2)
