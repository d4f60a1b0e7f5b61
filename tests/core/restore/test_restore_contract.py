"""What a restore promises, through the public API (CheckpointManager.save / restore).

* the step a restore loaded is what a resume continues from (``mgr.restored_step``);
* strict restore is about the targets: checkpoint keys that no target names never fail it;
  missing target keys and shape or dtype mismatches do, for every kind of target;
* a selector or rename that matches nothing, or an option of the wrong type, is a ConfigError
  that names the option and lists the checkpoint's top-level keys.
"""

from __future__ import annotations

import pytest
import torch

from ckpt_plugins import (
    CheckpointManager,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    RestoreError,
    capture_rng,
    restore_rng,
)


class Net(torch.nn.Module):
    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, width)
        self.fc2 = torch.nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _trained(dtype: torch.dtype = torch.float32, steps: int = 1) -> tuple[Net, torch.optim.Optimizer]:
    model = Net().to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(torch.randn(3, 4, dtype=dtype)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def _flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


# --- 1. the step a restore loaded ------------------------------------------------------------------


def test_resume_continues_from_the_step_restore_loaded_not_the_damaged_newest(tmp_path, caplog):
    """The README quick start: the newest checkpoint (40) is damaged, restore('latest') loads 35;
    the loop must continue at 36 on step-35 weights, not at 41."""
    model, opt = _trained()
    saved = {}
    with CheckpointManager(tmp_path) as mgr:
        for step in (35, 40):
            with torch.no_grad():
                model.fc1.weight.fill_(float(step))
            saved[step] = model.fc1.weight.clone()
            mgr.save(step, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    _flip_last_byte(tmp_path / "step_40" / "state.safetensors")

    fresh, fresh_opt = _trained()
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.restored_step is None  # nothing restored yet
        assert mgr.latest_step() == 40  # listed: damage is found by reading it
        mgr.restore("latest", target={"model": fresh, "optimizer": fresh_opt})
        assert "checkpoint step 40 is damaged" in caplog.text
        assert mgr.restored_step == 35
        assert mgr.last_restore_report.step == 35
        start = mgr.restored_step + 1
    assert start == 36
    assert torch.equal(fresh.fc1.weight, saved[35])


def test_restored_step_of_an_explicit_step_and_path(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(3, {"w": torch.ones(2)})
        mgr.save(7, {"w": torch.zeros(2)})
        mgr.restore(3)
        assert mgr.restored_step == 3
        mgr.restore(str(tmp_path / "step_7"))
        assert mgr.restored_step == 7
        with pytest.raises(CheckpointNotFoundError):
            mgr.restore(99)
        assert mgr.restored_step == 7, "a failed restore does not change what was restored"


# --- 2. strict restore names what to fill -----------------------------------------------------------


def test_readme_resume_pattern_restores_strictly_into_model_and_optimizer(tmp_path):
    """Saving capture_rng() and the step beside model and optimizer (the README's exact-resume
    advice), then a strict restore into {"model", "optimizer"}: the other keys are not a failure."""
    model, opt = _trained(steps=2)
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(5, {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": capture_rng(), "step": 5})
    expected = torch.rand(3)

    fresh, fresh_opt = _trained(steps=1)
    torch.manual_seed(123)
    with CheckpointManager(tmp_path) as mgr:
        state = mgr.restore("latest", target={"model": fresh, "optimizer": fresh_opt})
        report = mgr.last_restore_report
    assert report.missing == [] and report.mismatched == []
    assert report.unexpected == ["rng", "step"]
    assert state["step"] == 5
    restore_rng(state["rng"])
    assert torch.equal(torch.rand(3), expected), "the generators continue from where the save left them"
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_strict_still_fails_on_a_key_the_target_asks_for(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"a": torch.ones(3), "extra": 1})
        target = {"a": torch.zeros(3), "c": torch.zeros(1)}
        with pytest.raises(RestoreError, match="missing in checkpoint: c") as info:
            mgr.restore(1, target=target)
        assert "unexpected" not in str(info.value), "a key no target names is not a reason to fail"
        assert "(in the checkpoint but asked for by no target, not a failure: extra)" in str(info.value)
        assert torch.equal(target["a"], torch.zeros(3)), "a failed strict restore changed the target"


# --- 3. dtype is checked with shape, for every kind of target -------------------------------------


def _float64_checkpoint(tmp_path):
    model, opt = _trained(torch.float64)
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(
            1, {"model": model.state_dict(), "optimizer": opt.state_dict(), "w": torch.ones(3, dtype=torch.float64)}
        )
    return model, opt


def test_float64_checkpoint_into_float32_module_fails_strict_and_names_the_key(tmp_path):
    _float64_checkpoint(tmp_path)
    target = Net()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(RestoreError, match=r"model\.fc1\.weight.*float64.*float32") as info:
            mgr.restore(1, target={"model": target})
    assert "model.fc1.weight" in info.value.report.mismatched
    for name, value in target.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed by a failed strict restore"


def test_float64_into_float32_module_tolerant_skips_and_reports(tmp_path):
    _float64_checkpoint(tmp_path)
    target = Net()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with CheckpointManager(tmp_path) as mgr:
        mgr.restore(1, target={"model": target}, strict=False)
        report = mgr.last_restore_report
    assert sorted(report.mismatched) == sorted(f"model.{k}" for k in before)
    assert report.loaded == []
    assert "float64" in report.details["model.fc1.weight"]
    for name, value in target.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, before[name])


def test_float64_into_float32_tensor_and_dict_targets(tmp_path):
    _float64_checkpoint(tmp_path)
    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(RestoreError, match=r"w \(checkpoint \(3,\) torch.float64, target \(3,\) torch.float32\)"):
            mgr.restore(1, target={"w": torch.zeros(3)})
        sd = {k: torch.zeros_like(v) for k, v in Net().state_dict().items()}
        with pytest.raises(RestoreError, match=r"model\.fc2\.bias"):
            mgr.restore(1, target={"model": sd})


def test_float64_optimizer_state_into_float32_optimizer_fails_strict(tmp_path):
    """torch's Optimizer.load_state_dict would cast silently; a strict restore refuses it."""
    _float64_checkpoint(tmp_path)
    _, opt32 = _trained(torch.float32)
    before = opt32.state_dict()["state"][0]["exp_avg"].clone()
    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(RestoreError, match=r"optimizer\.state\.0\.exp_avg.*float64.*float32"):
            mgr.restore(1, target={"optimizer": opt32})
        assert torch.equal(opt32.state_dict()["state"][0]["exp_avg"], before)
        mgr.restore(1, target={"optimizer": opt32}, strict=False)
        assert "optimizer.state.0.exp_avg" in mgr.last_restore_report.mismatched
    assert torch.equal(opt32.state_dict()["state"][0]["exp_avg"], before), "tolerant mode skips a mismatch"


def test_optimizer_with_other_param_groups_fails_strict_before_changing_anything(tmp_path):
    _, opt = _trained()
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"optimizer": opt.state_dict()})
        other = torch.optim.Adam(Net(width=8).fc1.parameters())
        with pytest.raises(RestoreError, match="optimizer"):
            mgr.restore(1, target={"optimizer": other})


# --- 4. selectors and renames that match nothing, options of the wrong type -----------------------


@pytest.fixture
def saved_run(tmp_path):
    model, opt = _trained()
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1})
    return tmp_path


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"include": "modle.*"}, "include 'modle.*'"),
        ({"include": ["model.*", "optimzer"]}, "include 'optimzer'"),
        ({"exclude": "optimzer"}, "exclude 'optimzer'"),
        ({"rename": {"modle.": "net."}}, "rename 'modle.'"),
    ],
)
def test_selector_or_rename_matching_nothing_lists_the_top_level_keys(saved_run, kwargs, option):
    with CheckpointManager(saved_run) as mgr:
        with pytest.raises(ConfigError, match="matches nothing") as info:
            mgr.restore(1, **kwargs)
    message = str(info.value)
    assert option in message
    assert "model, optimizer, step" in message


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"include": 5}, "include"),
        ({"include": [5]}, "include"),
        ({"exclude": b"model"}, "exclude"),
        ({"rename": "model."}, "rename"),
        ({"rename": {"model.": 3}}, "rename"),
        ({"strict": "yes"}, "strict"),
    ],
)
def test_restore_options_of_the_wrong_type_are_config_errors(saved_run, kwargs, option):
    with CheckpointManager(saved_run) as mgr:
        with pytest.raises(ConfigError, match=f"^{option} ") as info:
            mgr.restore(1, **kwargs)
    assert not isinstance(info.value, TypeError)


def test_selector_matching_nothing_in_a_foreign_file(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "plain.pt")
    with CheckpointManager(tmp_path / "run") as mgr:
        assert set(mgr.restore(str(tmp_path / "plain.pt"), include="model")) == {"model"}
        with pytest.raises(ConfigError, match="include 'modle' matches nothing.*keys are: model, epoch"):
            mgr.restore(str(tmp_path / "plain.pt"), include="modle")


def test_selectors_that_match_still_work(saved_run):
    with CheckpointManager(saved_run) as mgr:
        assert list(mgr.restore(1, include="model.*")) == ["model"]
        assert set(mgr.restore(1, exclude="optimizer")) == {"model", "step"}
        renamed = mgr.restore(1, include="model", rename={"model.fc1.": "model.enc."})
        assert set(renamed["model"]) == {"enc.weight", "enc.bias", "fc2.weight", "fc2.bias"}


# --- 6. errors about state carry key_path --------------------------------------------------------


def test_a_root_module_target_against_a_nested_checkpoint_says_how_to_hoist(tmp_path):
    model, _ = _trained()
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"model": model.state_dict(), "step": 1})
        fresh = Net()
        with pytest.raises(RestoreError, match=r"rename=\{'model\.': ''\}"):
            mgr.restore(1, target=fresh)
        mgr.restore(1, target=fresh, include="model", rename={"model.": ""})
    assert torch.equal(fresh.fc1.weight, model.fc1.weight)


def test_restore_error_carries_key_path_and_report(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"a": torch.ones(3)})
        with pytest.raises(RestoreError) as one:
            mgr.restore(1, target={"a": torch.zeros(4)})
        assert one.value.key_path == "a"
        with pytest.raises(RestoreError) as two:
            mgr.restore(1, target={"a": torch.zeros(4), "b": torch.zeros(1)})
        assert two.value.key_path is None  # about several keys
        assert two.value.report.missing == ["b"] and two.value.report.mismatched == ["a"]


def test_unrelated_corrupt_checkpoint_error_has_no_key_path(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"a": torch.ones(64)})
    _flip_last_byte(tmp_path / "step_1" / "state.safetensors")
    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(CorruptCheckpointError) as info:
            mgr.restore(1)
    assert info.value.key_path is None
