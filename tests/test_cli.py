"""Scripts fail with one clear error line (no traceback) on bad input, and say what SCAN needs."""

from helpers import BIN, PYTHON, run_cli


def last_line(proc):
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def assert_clean_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    line = last_line(proc)
    assert line.startswith(("train.py: error:", "scan-zoo: error:")), proc.stderr
    for n in needles:
        assert n in line, line


def test_unknown_option():
    assert_clean_error(run_cli([PYTHON, "train.py", "--no-such-option", "3"]), "unrecognized arguments")


def test_missing_data_directory(tmp_path):
    p = run_cli(
        [
            PYTHON,
            "train.py",
            "--method",
            "moco",
            "--data",
            str(tmp_path / "missing"),
            "--output-dir",
            str(tmp_path / "run"),
        ]
    )
    assert_clean_error(p, "data directory not found", str(tmp_path / "missing"))


def test_unknown_backbone(tiny_data, tmp_path):
    p = run_cli(
        [
            PYTHON,
            "train.py",
            "--method",
            "moco",
            "--data",
            str(tiny_data),
            "--model",
            "resnet_9000",
            "--output-dir",
            str(tmp_path / "run"),
        ]
    )
    assert_clean_error(p, "unknown backbone", "resnet_9000")


def test_bad_value_type(tmp_path):
    assert_clean_error(run_cli([PYTHON, "train.py", "--epochs", "many"]), "epochs expects a int")


def test_scan_without_neighbours_says_what_it_needs(tiny_data, tmp_path):
    p = run_cli(
        [
            PYTHON,
            "train.py",
            "--method",
            "scan",
            "--data",
            str(tiny_data),
            "--init-from",
            "none",
            "--output-dir",
            str(tmp_path / "run"),
        ]
    )
    assert_clean_error(p, "--neighbors", "--appearance-model")
    p = run_cli(
        [PYTHON, "train.py", "--method", "scan", "--data", str(tiny_data), "--output-dir", str(tmp_path / "run")]
    )
    assert_clean_error(p, "--init-from")


def test_out_of_range_value():
    assert_clean_error(run_cli([PYTHON, "train.py", "--log-every-steps", "0"]), "log_every_steps must be at least 1")


def test_bad_config_file(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("epochs: 3\nnot_an_option: 1\n")
    assert_clean_error(run_cli([PYTHON, "train.py", "--config", str(cfg)]), "not_an_option")


def test_scan_zoo_data_digits_and_mine(tmp_path, tiny_data):
    # mining needs a label-free model: export a random-init backbone the way a run does
    import timm

    from scan_zoo.cli import main
    from scan_zoo.models.backbones import data_config_for, export_backbone

    export_backbone(
        timm.create_model("test_resnet", num_classes=0),
        tmp_path / "m",
        data_config_for(16, 16, (0.5,) * 3, (0.5,) * 3),
        {"method": "none"},
    )
    assert (
        main(
            [
                "mine",
                "--model",
                str(tmp_path / "m"),
                "--data",
                str(tiny_data),
                "--out",
                str(tmp_path / "nb.safetensors"),
                "--k",
                "2",
                "--image-size",
                "16",
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    from scan_zoo.data.neighbor_table import load_neighbors

    idx, _, prov = load_neighbors(tmp_path / "nb.safetensors")
    assert idx.shape == (48, 2) and prov["k"] == 2
    p = run_cli([str(BIN / "scan-zoo"), "mine", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert_clean_error(p, "model reference not found")


def test_scan_zoo_data_digits_writes_the_tree(tmp_path):
    p = run_cli([str(BIN / "scan-zoo"), "data", "digits", "--out", str(tmp_path / "dg")])
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "dg" / "train" / "7").is_dir() and (tmp_path / "dg" / "metadata.npz").is_file()


def test_error_line_is_last_under_accelerate_launch_quiet(tmp_path):
    """`accelerate launch -q` leaves train.py's error line last (without -q the launcher adds its own traceback)."""
    p = run_cli(
        [
            str(BIN / "accelerate"),
            "launch",
            "-q",
            "--num_processes",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "train.py",
            "--method",
            "moco",
            "--data",
            str(tmp_path / "missing"),
        ]
    )
    assert p.returncode != 0
    assert last_line(p) == f"train.py: error: data directory not found: {tmp_path / 'missing'}"


def test_non_finite_loss_stops_with_one_line_naming_the_step(tiny_data, tmp_path):
    p = run_cli(
        [
            PYTHON,
            "train.py",
            "--method",
            "supervised",
            "--data",
            str(tiny_data),
            "--model",
            "test_resnet",
            "--image-size",
            "16",
            "--eval-resize",
            "16",
            "--num-workers",
            "0",
            "--batch-size",
            "8",
            "--lr",
            "1e30",
            "--epochs",
            "3",
            "--output-dir",
            str(tmp_path / "run"),
        ]
    )
    assert p.returncode == 3, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert last_line(p).startswith("train.py: training stopped: loss is not finite at step ")
