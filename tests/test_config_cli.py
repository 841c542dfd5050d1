"""The command line built from the typed configs: help text and choices for every flag, bad values
rejected at parse time, `--config` files (YAML, TOML, JSON, a run's own config.json) that round-trip,
`--print-config`, and a `--help` that does not import torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from climber.cli import build_parser, main
from climber.config import PrepareConfig, TrainConfig, field_help, read_config_file
from climber.data.sumi import prepare
from tests.helpers import synthetic_log

STRATEGIES = ("recent", "pos:like")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data") / "synthetic"
    prepare(synthetic_log(n_users=12, per_user=12), d, PrepareConfig(request_gap=50, max_candidates=4), STRATEGIES)
    return d


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "r1"
    main(["train", "--data", str(data_dir), "--out", str(out), "--preset", "tiny", "--epochs", "1", "--max-steps", "2",
          "--batch-size", "4", "--lr", "0.003", "--no-bgf", "--strategies", "recent", "pos:like", "--device", "cpu"])
    return out


def printed_config(capsys, *argv: str) -> dict:
    capsys.readouterr()
    main([*argv, "--print-config"])
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("command", ["train", "compare", "evaluate"])
def test_config_every_flag_has_help_and_a_stated_default(command):
    for a in build_parser()[1][command]._actions:
        if not a.option_strings or a.dest == "help":
            continue
        assert a.help and len(a.help) > 10, f"{command} {a.option_strings[0]} has no help"
        if not a.required and a.dest not in ("config", "print_config", "train_only", "data", "output"):
            assert "default" in a.help, f"{command} {a.option_strings[0]}: {a.help!r} states no default"


def test_config_help_text_comes_from_the_field_comments():
    h = field_help(TrainConfig)
    assert h["patience"] == "validations without AUC gain before early stopping"
    assert h["train_negatives"].startswith("implicit data: negatives per positive")  # the lines above the field
    assert set(h) == {f for f in TrainConfig.__dataclass_fields__}


def test_config_train_help_documents_config_and_choices(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--config FILE" in out and "--print-config" in out
    assert "{tiny,small,base,large,paper}" in out and "{auto,reference,triton}" in out
    assert "{climber,dlrm,din,twin,transformer,hstu}" in out


@pytest.mark.parametrize("flag, value, says", [
    ("--preset", "huge", "invalid choice: 'huge'"),
    ("--arch", "gpt", "invalid choice: 'gpt'"),
    ("--attention", "flash", "invalid choice: 'flash'"),
    ("--lr", "-1", "lr and embedding_lr_mult must be positive"),
    ("--strategies", "pos", "strategy 'pos'"),
    ("--n-heads", "3", "not divisible by n_heads=3"),
])
def test_config_bad_values_fail_at_parse_time(tmp_path, capsys, flag, value, says):
    # the data directory does not exist: the error must come before anything reads it
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "r"), flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err and "meta.json" not in err
    assert not (tmp_path / "r").exists()


def test_config_json_of_a_run_round_trips(finished_run, tmp_path, capsys):
    saved = json.loads((finished_run / "config.json").read_text())
    printed = printed_config(capsys, "train", "--config", str(finished_run / "config.json"), "--out", "r2")
    sections = ("model", "train", "runtime")
    assert {k: printed[k] for k in sections} == {k: saved[k] for k in sections}
    assert saved["model"]["bgf"] is False and saved["train"]["lr"] == 0.003  # the flags given to the first run
    assert printed["data"] == saved["data"]
    # training from it gives a run with the same configuration
    main(["train", "--config", str(finished_run / "config.json"), "--out", str(tmp_path / "r2")])
    again = json.loads((tmp_path / "r2" / "config.json").read_text())
    assert {k: again[k] for k in ("model", "train", "runtime", "data_fingerprint")} == \
        {k: saved[k] for k in ("model", "train", "runtime", "data_fingerprint")}
    # and the run resumes (a changed config would be refused) from its own config.json
    main(["train", "--config", str(tmp_path / "r2" / "config.json"), "--out", str(tmp_path / "r2")])


def test_config_flags_on_the_command_line_override_the_file(finished_run, capsys):
    cfg = str(finished_run / "config.json")
    printed = printed_config(capsys, "train", "--lr", "0.5", "--config", cfg, "--out", "x", "--bgf", "--arch", "dlrm",
                             "--strategies", "recent")
    assert printed["train"]["lr"] == 0.5 and printed["train"]["batch_size"] == 4
    assert printed["model"]["bgf"] is True and printed["model"]["arch"] == "dlrm"
    assert printed["model"]["strategies"] == ["recent"] and printed["model"]["seq_len"] == 8  # tiny, from the file


def test_config_yaml_toml_json_and_printed_config_agree(data_dir, tmp_path, capsys):
    flags = ["train", "--data", str(data_dir), "--out", "r", "--preset", "tiny", "--lr", "0.01", "--no-adaptive",
             "--head-hidden", "8", "4", "--task-weights", "--attention", "reference"]
    expect = printed_config(capsys, *flags)
    (tmp_path / "run.yaml").write_text(f"data: {data_dir}\nout: r\npreset: tiny\nlr: 0.01\nmodel:\n  adaptive: false\n"
                                       "  head_hidden: [8, 4]\ntask-weights: []\nruntime:\n  attention: reference\n")
    (tmp_path / "run.toml").write_text(f'data = "{data_dir}"\nout = "r"\npreset = "tiny"\nadaptive = false\n'
                                       'head_hidden = [8, 4]\ntask_weights = []\n[train]\nlr = 0.01\n'
                                       '[runtime]\nattention = "reference"\n')
    (tmp_path / "printed.json").write_text(json.dumps(expect))
    for name in ("run.yaml", "run.toml", "printed.json"):
        assert printed_config(capsys, "train", "--config", str(tmp_path / name)) == expect, name


@pytest.mark.parametrize("text, says", [
    ("data: x\nout: y\nlr_typo: 3\n", "unknown setting(s) lr_typo"),
    ("data: x\nout: y\nmodel:\n  d_modle: 3\n", "unknown setting(s) model.d_modle"),
    ("data: x\nout: y\nadaptive: 3\n", "adaptive must be true or false"),
    ("data: x\nout: y\nlr: [1, 2]\n", "lr takes one value"),
    ("- a\n- b\n", "must hold a mapping"),
    ("a: [1\n", "not valid YAML"),
])
def test_config_file_errors_name_the_file(tmp_path, capsys, text, says):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err and "bad.yaml" in err


def test_config_file_choices_are_checked(tmp_path, capsys):
    (tmp_path / "c.toml").write_text('data = "x"\nout = "y"\n[runtime]\nattention = "flash"\n')
    with pytest.raises(SystemExit):
        main(["train", "--config", str(tmp_path / "c.toml")])
    assert "invalid choice: 'flash'" in capsys.readouterr().err


def test_config_json_for_evaluate_takes_its_settings_and_names_the_rest(finished_run, capsys):
    main(["evaluate", "--config", str(finished_run / "config.json"), "--checkpoint", str(finished_run / "best"),
          "--print-config"])
    out, err = capsys.readouterr()
    saved = json.loads((finished_run / "config.json").read_text())
    printed = json.loads(out)
    assert printed["data"] == saved["data"]
    assert printed["runtime"] == {"device": "cpu", "attention": "auto", "threads": 0}
    assert "ignoring settings this command does not take: model.* (" in err and "runtime.compile" in err


def test_config_read_rejects_other_suffixes(tmp_path):
    (tmp_path / "run.ini").write_text("[a]\n")
    with pytest.raises(ValueError, match=r"\.yaml, \.yml, \.toml or \.json"):
        read_config_file(tmp_path / "run.ini")


def test_config_cli_help_imports_no_torch():
    code = ("import sys; from climber.cli import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit:\n"
            "    pass\nassert 'torch' not in sys.modules, 'climber train --help imported torch'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
