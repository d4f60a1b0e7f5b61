"""What the commands print: labels, damage, unsafe files, help, pipes and ``--json``."""

from __future__ import annotations

import json
import os
import subprocess

import torch
from cli_runs import CLI, json_of, plain_run, run_cli

from ckpt_plugins import CheckpointManager
from ckpt_plugins.cli import main


class RunsCode:
    """Unpickling this runs ``os.system``: a hostile checkpoint."""

    def __reduce__(self):
        return (os.system, ("echo this-should-never-run",))


def test_inspect_lists_numpy_arrays_of_capture_rng(tmp_path, capsys):
    run = plain_run(tmp_path / "run")
    assert main(["inspect", str(run / "step_4")]) == 0
    out = capsys.readouterr().out
    assert "rng.numpy" in out and "uint32" in out and "(624,)" in out and "model.w" in out


def test_ls_labels_come_from_the_rules_the_run_stored(tmp_path, capsys):
    run = plain_run(tmp_path / "run", keep_last=1, keep_best=1, monitor="loss")
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step_")) == ["step_2", "step_4"]
    assert main(["ls", str(run)]) == 0
    out = capsys.readouterr().out
    assert "keep_all" not in out
    assert "keep_last=1" in out and "keep_best=1" in out and "monitor=loss" in out  # the rules shown
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0].isdigit()}
    assert "keep_best" in rows["2"] and "best" in rows["2"] and "keep_last" in rows["4"]
    doc = json_of("ls", run)
    assert doc["rules"] == {
        "keep_last": 1,
        "keep_best": 1,
        "monitor": "loss",
        "mode": "min",
        "keep_every_n_steps": None,
        "keep_time_interval": None,
    }
    assert [c["kept_by"] for c in doc["checkpoints"]] == [["keep_best", "best"], ["keep_last", "latest"]]
    # flags on the command line are a what-if: they replace the stored rules
    doc = json_of("ls", run, "--keep-last", "2")
    assert doc["rules"]["keep_last"] == 2 and doc["rules"]["keep_best"] is None


def test_ls_of_manifests_without_stored_rules_does_not_claim_keep_all(tmp_path, capsys):
    run = plain_run(tmp_path / "run")
    for step in (1, 2, 3, 4):  # a manifest written before rules were stored
        path = run / f"step_{step}" / "manifest.json"
        doc = json.loads(path.read_text())
        doc.pop("retention", None)
        path.write_text(json.dumps(doc))
    assert main(["ls", str(run)]) == 0
    out = capsys.readouterr().out
    assert "keep_all" not in out and "rules unknown" in out
    assert json_of("ls", run)["rules"] is None


def test_a_truncated_manifest_shows_damaged_not_an_age(tmp_path, capsys):
    run = plain_run(tmp_path / "run")
    manifest = run / "step_3" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:100])
    assert main(["ls", str(run)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.split() and line.split()[0] == "3")
    assert "DAMAGED" in row and "d " not in row.replace("DAMAGED", "")
    assert "20" not in row.split("DAMAGED")[0].split()[-1]  # no absurd age (days since 1970)
    entry = json_of("ls", run)["checkpoints"][2]
    assert entry["step"] == 3 and entry["damaged"] and "manifest.json" in entry["damaged"]
    assert entry["age_s"] is None


def test_inspect_on_a_run_folder_points_to_ls(tmp_path, capsys):
    run = plain_run(tmp_path / "run")
    assert main(["inspect", str(run)]) == 2
    err = capsys.readouterr().err
    assert "ckpt-plugins ls" in err and "step_4" in err


def test_inspect_piped_into_head_ends_quietly(tmp_path):
    torch.save({f"layer.{i}.weight": torch.zeros(1) for i in range(4000)}, tmp_path / "many.pt")
    result = subprocess.run(
        f"{' '.join(CLI)} inspect {tmp_path / 'many.pt'} | head -3",
        shell=True,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0
    assert len(result.stdout.splitlines()) == 3
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr


def test_every_subcommand_option_has_help_text():
    from ckpt_plugins.cli.main import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert {"ls", "inspect", "verify", "prune", "diff", "convert"} <= set(commands)
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, sub in commands.items()
        for action in sub._actions
        if action.dest != "help" and not action.help
    ]
    assert not missing, f"options without help: {missing}"


def test_read_commands_take_json(tmp_path):
    run = plain_run(tmp_path / "run")
    doc = json_of("inspect", run / "step_2")
    assert doc["step"] == 2 and doc["format"] == "ckpt_plugins" and doc["metrics"] == {"loss": 0.4}
    assert {"key": "model.w", "shape": [4, 4], "dtype": "float32", "bytes": 64} in doc["entries"]
    doc = json_of("verify", run)
    assert doc["ok"] is True and [r["status"] for r in doc["results"]] == ["OK"] * 4
    doc = json_of("diff", run / "step_1", run / "step_2")
    assert doc["identical"] is False
    assert {d["key"]: d["change"] for d in doc["differences"]}["step"] == "value"
    doc = json_of("ls", run)
    assert [c["step"] for c in doc["checkpoints"]] == [1, 2, 3, 4]
    assert all(c["size_bytes"] > 0 and c["age_s"] >= 0 for c in doc["checkpoints"])


def test_a_hostile_pickle_is_unsafe_and_the_global_is_named(tmp_path, capsys):
    torch.save({"x": RunsCode()}, tmp_path / "evil.pt")
    assert main(["verify", str(tmp_path / "evil.pt")]) == 1
    out = capsys.readouterr().out
    assert out.startswith("UNSAFE") and "DAMAGED" not in out
    assert "posix.system" in out and 'allow-list"' not in out
    assert main(["inspect", str(tmp_path / "evil.pt")]) == 2
    assert "posix.system" in capsys.readouterr().err
    doc = json_of("verify", tmp_path / "evil.pt")
    assert doc["ok"] is False and doc["results"][0]["status"] == "UNSAFE"


def test_progress_and_colour_are_off_when_not_a_terminal(tmp_path):
    run = plain_run(tmp_path / "run")
    for args in (("verify", run), ("diff", run / "step_1", run / "step_4"), ("ls", run)):
        result = run_cli(*args)
        assert result.returncode in (0, 1), result.stderr
        assert "\x1b[" not in result.stdout + result.stderr, args


def test_a_malformed_retention_field_is_damage_not_a_crash(tmp_path, capsys):
    run = plain_run(tmp_path / "run")
    path = run / "step_2" / "manifest.json"
    doc = json.loads(path.read_text())
    doc["retention"] = {"keep_last": "three"}
    path.write_text(json.dumps(doc))
    assert main(["ls", str(run)]) == 0
    out = capsys.readouterr().out
    assert "DAMAGED step_2" in out and "retention flag 'keep_last'" in out
    assert main(["verify", str(run / "step_2")]) == 1


def _run_with_terminal_stderr(*args: str) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal and stdout on a pipe."""
    import pty
    import select

    leader, follower = pty.openpty()
    result = subprocess.run(
        [*CLI, *map(str, args)], stdin=follower, stdout=subprocess.PIPE, stderr=follower, timeout=240
    )
    os.close(follower)
    seen = b""
    while select.select([leader], [], [], 0.5)[0]:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    return result.returncode, result.stdout.decode(), seen.decode(errors="replace")


def test_progress_bar_on_a_terminal_leaves_piped_stdout_whole(tmp_path):
    run = plain_run(tmp_path / "run")
    code, out, terminal = _run_with_terminal_stderr("verify", run)
    assert code == 0 and "verifying" in terminal
    assert out.splitlines() == [f"OK       {run / f'step_{s}'}" for s in (1, 2, 3, 4)]


def test_rule_flag_errors_name_the_command_line_flags(tmp_path, capsys):
    run = plain_run(tmp_path / "run")
    assert main(["ls", str(run), "--keep-best", "1"]) == 2
    assert "--keep-best=1 needs --monitor" in capsys.readouterr().err
    assert main(["prune", str(run), "--keep-last", "0"]) == 2
    assert "--keep-last must be a positive integer" in capsys.readouterr().err


def test_remote_run_folders_are_listed_verified_and_pruned(capsys):
    url = "memory://cli-remote-run"
    with CheckpointManager(url, keep_last=3) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": torch.full((2,), float(step))}, metrics={"loss": 1.0 / step})
    assert main(["verify", url]) == 0
    assert capsys.readouterr().out.splitlines() == [f"OK       {url}/step_{s}" for s in (1, 2, 3)]
    assert main(["diff", f"{url}/step_1", f"{url}/step_3"]) == 1
    assert "~ w: values differ (max |A-B| = 2)" in capsys.readouterr().out
    assert main(["prune", url, "--keep-last", "1", "--yes"]) == 0
    capsys.readouterr()
    assert main(["ls", url]) == 0
    out = capsys.readouterr().out
    assert "step_3" in out and "step_1" not in out and "rules: keep_last=3 (stored in step_3)" in out


def test_convert_to_lightning_refuses_a_plain_run_and_names_the_alternative(tmp_path, capsys):
    run = plain_run(tmp_path / "run")
    assert main(["convert", str(run), str(tmp_path / "m.ckpt"), "--to", "lightning"]) == 2
    err = capsys.readouterr().err
    assert "step_4 is not a Lightning checkpoint" in err and "--to safetensors" in err
    assert not (tmp_path / "m.ckpt").exists()
    assert main(["convert", str(run), str(tmp_path / "w.safetensors"), "--to", "safetensors"]) == 0
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "w.safetensors")) == {"model.w", "model.b", "rng.torch"}
