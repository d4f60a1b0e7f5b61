"""The framework halves of sharded state on CPU: Lightning FSDPStrategy's FSDP1 state
(ShardedTensor) and the HF Trainer's accelerate FSDP2 state, each with the state torch really
produces on 2 and 3 gloo processes (tests/helpers/fsdp_cases.py), bit-exact against the full state
torch gathers. The Trainer and Lightning ends of these paths need CUDA (docs/sharded.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import TrainingArguments

import sharded_cases as cases
from ckpt_plugins import CheckpointManager
from ckpt_plugins.errors import ConfigError
from ckpt_plugins.hf import fsdp as hf_fsdp
from ckpt_plugins.hf.options import CallbackOptions, resolve


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_fsdp1_sharded_tensors_are_stored_as_chunks_of_the_same_manifest_entries(root):
    (step,) = (root / "fsdp1").glob("step_*")
    manifest = _manifest(step)
    tensors = manifest["sharded"]["tensors"]
    weight = tensors["state_dict.0.weight"]
    assert weight["shape"] == [cases.HID, cases.IN] and weight["dtype"] == "F32"
    assert [(c["offsets"], c["sizes"], c["file"]) for c in weight["chunks"]] == [
        ([0, 0], [4, 5], "shard_0.safetensors"),
        ([4, 0], [4, 5], "shard_1.safetensors"),
    ]
    bias = tensors["state_dict.2.bias"]  # 3 rows over 2 ranks: torch.chunk gives (2, 1)
    assert [(c["offsets"], c["sizes"]) for c in bias["chunks"]] == [([0], [2]), ([2], [1])]
    assert "optimizer_states.0.state.0.weight.exp_avg" in tensors  # keyed by parameter name
    assert manifest["format_version"] == 4  # chunked checksums (docs/format.md)


def test_fsdp1_checkpoint_restores_into_a_plain_module_in_one_process(root):
    model = cases.build("plain")
    opt = cases.optimizer(model)
    with CheckpointManager(root / "fsdp1", read_only=True) as mgr:
        mgr.restore("latest", target={"state_dict": model, "optimizer_states": [opt]})
    cases.assert_same(
        cases.plain_full_state(model, opt), load_file(root / "expected_fsdp1.safetensors"), "FSDP1 2 -> 1"
    )


def test_hf_fsdp2_checkpoint_restores_into_a_plain_model(root):
    """What a Trainer that is not sharded (one process, or accelerate's DDP fallback on CPU) reads
    from a sharded checkpoint-N: the adapter's own restore functions, the same the Trainer's
    wrapped _load_from_checkpoint / _load_optimizer_and_scheduler call."""
    folder = root / "hf" / "checkpoint-4"
    assert hf_fsdp.is_sharded_checkpoint_folder(folder) and not (folder / "model.safetensors").exists()
    model = cases.build("plain")
    opt = cases.optimizer(model)
    assert not hf_fsdp.is_sharded_model(model)
    assert hf_fsdp.restore_model(folder, model).ok and hf_fsdp.restore_optimizer(folder, opt).ok
    cases.assert_same(cases.plain_full_state(model, opt), load_file(root / "expected_hf.safetensors"), "HF 2 -> 1")


def test_no_file_of_a_sharded_framework_save_is_a_pickle(root):
    for folder in ("fsdp1", "hf"):
        for path in (root / folder).rglob("*"):
            if path.is_file() and path.name != ".lock":
                head = path.read_bytes()[:2]
                assert head[:1] != b"\x80" and head != b"PK", path


def test_fsdp2_trainer_arguments_are_accepted_and_fsdp1_is_refused_with_the_option_named(tmp_path):
    fsdp2 = TrainingArguments(str(tmp_path), fsdp="full_shard", fsdp_config={"version": 2}, report_to=[])
    assert resolve(CallbackOptions(), fsdp2).dirpath == str(tmp_path)
    fsdp1 = TrainingArguments(str(tmp_path), fsdp="full_shard", fsdp_config={"version": 1}, report_to=[])
    with pytest.raises(ConfigError, match=r"fsdp_config has version=1 \(FSDP1\); set fsdp_config=\{'version': 2\}"):
        resolve(CallbackOptions(), fsdp1)


def test_accelerate_ignores_the_fsdp2_plugin_on_cpu(root):
    """The fallback docs/sharded.md describes, observed on 2 gloo processes: the plugin the Trainer
    builds from fsdp=True, fsdp_config={"version": 2} is dropped by accelerate on CPU
    (DistributedType.MULTI_CPU, no fsdp_plugin) and the model is wrapped in DDP, not fully_shard."""
    for rank in (0, 1):
        doc = json.loads((root / f"accelerate_rank{rank}.json").read_text())
        assert doc == {
            "plugin_args_version": 2,
            "distributed_type": "MULTI_CPU",
            "fsdp_plugin": False,
            "model": "DistributedDataParallel",
        }, doc
