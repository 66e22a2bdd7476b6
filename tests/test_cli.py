"""The CLI end to end on the embedded digits, and its one-line errors on bad input."""
import json
import shutil

import numpy as np
import pytest

from abscert_bench.cli import build_parser, main
from abscert_bench.data.idx import write_idx

VERBS = ["train", "verify", "table", "compare", "demo", "data", "bench"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("abscert-bench: error")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("verb", VERBS)
def test_help_on_every_verb(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    assert "usage: abscert-bench " + verb in capsys.readouterr().out


def test_train_verify_table(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, _ = run_cli(capsys, "train", "--method", "natural", "--model", "fc3", "--epochs", "2",
                           "--out", str(run))
    assert code == 0 and "trained natural" in out
    code, out, _ = run_cli(capsys, "verify", str(run), "--verifiers", "ibp,pgd", "--limit", "15")
    assert code == 0 and "ibp" in out and "pgd" in out
    code, out, _ = run_cli(capsys, "table", str(tmp_path), "--csv", str(tmp_path / "t.csv"))
    assert code == 0
    header = out.splitlines()[0]
    assert "IBP bound" in header and "PGD (attack, upper bound)" in header and "clean acc" in header
    assert (tmp_path / "t.csv").read_text().startswith("dataset,model,eps,method")


def test_existing_run_dir_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(capsys, "train", "--method", "natural", "--model", "fc3", "--epochs", "1", "--out", str(run))[0] == 0
    before = (run / "checkpoint.pt").read_bytes()
    code, _, err = run_cli(capsys, "train", "--method", "natural", "--model", "fc3", "--epochs", "1",
                           "--seed", "5", "--out", str(run))
    assert_one_line_error(code, err, "already exists", "--force")
    assert (run / "checkpoint.pt").read_bytes() == before
    assert run_cli(capsys, "train", "--method", "natural", "--model", "fc3", "--epochs", "1", "--seed", "5",
                   "--out", str(run), "--force")[0] == 0
    assert (run / "checkpoint.pt").read_bytes() != before


@pytest.mark.parametrize("argv, fragments", [
    (["--dataset", "imagenet21k"], ["unknown dataset", "digits"]),
    (["--model", "gpt"], ["unknown model", "dm_small"]),
    (["--method", "trades"], ["unknown training method", "crown-ibp"]),
    (["--eps", "-0.1"], ["eps must be in [0, 1]"]),
    (["--eps", "1.5"], ["eps must be in [0, 1]"]),
    (["--d", "0"], ["granularity d must be in (0, 1]"]),
    (["--d", "-0.2"], ["granularity d must be in (0, 1]"]),
    (["--d", "abc"], ["comma-separated numbers"]),
    (["--device", "cuda:7"] , ["CUDA"]),
])
def test_train_bad_input(tmp_path, capsys, argv, fragments):
    code, _, err = run_cli(capsys, "train", "--epochs", "1", "--model", "fc3", *argv, "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, *fragments)


def test_unknown_verifier_and_bad_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    run_cli(capsys, "train", "--method", "natural", "--model", "fc3", "--epochs", "1", "--out", str(run))
    code, _, err = run_cli(capsys, "verify", str(run), "--verifiers", "marabou")
    assert_one_line_error(code, err, "unknown verifier", "alpha-crown")
    code, _, err = run_cli(capsys, "verify", str(run), "--verifiers", "abscert-paper")
    assert_one_line_error(code, err, "does not apply")
    code, _, err = run_cli(capsys, "verify", str(run), "--eps", "2")
    assert_one_line_error(code, err, "eps must be in [0, 1]")
    code, _, err = run_cli(capsys, "verify", str(run), "--timeout", "0")
    assert_one_line_error(code, err, "--timeout: must be > 0")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(run, corrupt)
    (corrupt / "checkpoint.pt").write_bytes(b"\x80garbage")
    code, _, err = run_cli(capsys, "verify", str(corrupt))
    assert_one_line_error(code, err, "corrupt checkpoint")

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "verify", str(empty))
    assert_one_line_error(code, err, "config.json")


def test_checkpoint_shape_must_match_dataset(tmp_path, capsys):
    run = tmp_path / "run"
    run_cli(capsys, "train", "--method", "natural", "--model", "fc3", "--epochs", "1", "--out", str(run))
    root = tmp_path / "data"
    (root / "mnist").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 6)):
        write_idx(root / "mnist" / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(root / "mnist" / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    config = json.loads((run / "config.json").read_text())
    config["dataset"] = "mnist"
    (run / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "verify", str(run), "--data-root", str(root))
    assert_one_line_error(code, err, "(1, 8, 8)", "(1, 28, 28)")


def test_missing_data_names_files_and_prepare_command(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--dataset", "fashion-mnist", "--data-root", str(tmp_path),
                           "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "train-images-idx3-ubyte", "abscert-bench data prepare")
    assert not (tmp_path / "r").exists()


def test_parser_names_every_verb():
    text = build_parser().format_help()
    for verb in VERBS:
        assert verb in text


def test_sound_stage_report(tmp_path, capsys):
    run = tmp_path / "abscert"
    assert run_cli(capsys, "train", "--method", "abscert", "--d", "0.2", "--model", "fc3", "--epochs", "2",
                   "--out", str(run))[0] == 0
    assert run_cli(capsys, "verify", str(run), "--verifiers", "abscert-paper,abscert-sound", "--limit", "12",
                   "--timeout", "2")[0] == 0
    code, out, _ = run_cli(capsys, "table", str(tmp_path), "--sound-stages")
    assert code == 0
    row = out.splitlines()[2]
    assert row.startswith("| abscert | 0.1 | 12 |")
    code, out, _ = run_cli(capsys, "recheck", str(run),
                           str(run / "verify" / "eps=0.1,first=12" / "abscert-sound.counterexamples.npz"))
    assert code == 0 and "counterexamples re-check" in out


def test_verify_memory_budget(tmp_path, capsys, monkeypatch):
    """--memory-mb reaches the bound verifiers; a budget no bound fits gives unknown, never a crash or a cap."""
    from abscert_bench import budget

    run = tmp_path / "run"
    assert run_cli(capsys, "train", "--method", "natural", "--model", "fc3", "--epochs", "1", "--out", str(run))[0] == 0
    code, _, err = run_cli(capsys, "verify", str(run), "--verifiers", "crown", "--limit", "5", "--memory-mb", "0")
    assert_one_line_error(code, err, "--memory-mb: must be > 0")
    monkeypatch.setattr(budget.MemoryWatch, "_growth", lambda self: 1e9)  # every bound looks too big
    code, out, _ = run_cli(capsys, "verify", str(run), "--verifiers", "crown", "--limit", "5", "--memory-mb", "64")
    assert code == 0
    summary = json.loads(next(run.glob("verify/*/crown.json")).read_text())
    assert summary["verified"] == 0 and summary["unknown"] + summary["falsified"] == 5


def test_compare_runs_through_the_harness(tmp_path, capsys):
    """compare: a results store in --out with table.md / table.csv; a rerun resumes it, --force replaces it, a
    folder the tool did not write is refused."""
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "natural,abscert", "--model", "fc3", "--epochs", "1", "--limit", "6",
            "--verifiers", "abscert-paper,ibp", "--out", str(out)]
    code, text, _ = run_cli(capsys, *argv)
    assert code == 0 and "AbsCert paper check (not sound)" in text and "IBP bound" in text
    assert (out / "table.md").read_text() in text and (out / "suite.json").exists()
    assert (out / "table.csv").read_text().startswith("dataset,model,eps,method,run")
    assert {p.name for p in (out / "cells").iterdir()} == {"digits_fc3_eps0.1_natural_s0",
                                                           "digits_fc3_eps0.1_abscert_s0"}
    from abscert_bench.harness.spec import load_spec

    assert len(load_spec(out / "spec.toml").cells) == 2  # the store's spec.toml is a spec of its own
    checkpoint = out / "cells" / "digits_fc3_eps0.1_natural_s0" / "run" / "checkpoint.pt"
    before = checkpoint.read_bytes()
    assert run_cli(capsys, *argv)[0] == 0 and checkpoint.read_bytes() == before  # resumed: nothing retrained
    code, _, err = run_cli(capsys, *argv[:-1], str(out), "--seed", "3")
    assert_one_line_error(code, err, "incompatible", "--force")
    assert run_cli(capsys, *argv, "--seed", "3", "--force")[0] == 0
    assert (out / "cells" / "digits_fc3_eps0.1_natural_s3").exists()
    assert not (out / "cells" / "digits_fc3_eps0.1_natural_s0").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    code, _, err = run_cli(capsys, *argv[:-1], str(foreign), "--force")
    assert_one_line_error(code, err, "not a suite results store")
    assert (foreign / "notes.txt").read_text() == "keep"
    code, _, err = run_cli(capsys, *argv[:-1], str(tmp_path / "x"), "--eps", "1.5")
    assert_one_line_error(code, err, "eps must be in [0, 1]")


def test_training_defaults_come_from_train_config():
    from abscert_bench.training.config import TRAIN_FIELD_DEFAULTS, field_default

    args = build_parser().parse_args(["train", "--out", "x"])
    for name, default in TRAIN_FIELD_DEFAULTS.items():
        if hasattr(args, name) and name != "lr_milestones":
            assert getattr(args, name) == default, name
    assert args.seed == field_default("seed") and args.lr_milestones == ""
    assert build_parser().parse_args(["compare", "--out", "x"]).epochs == TRAIN_FIELD_DEFAULTS["epochs"]
