"""Tests for ckpt_plugins.formats: readers of checkpoints written by other tools.

Every format is exercised with files written by the real framework (a Lightning Trainer fit, a
transformers Trainer run, save_pretrained, PEFT, torch.save, safetensors, DCP). The two Trainer
runs are the slow part and are built once per module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import ckpt_plugins.formats.safetensors_file as safetensors_module
from ckpt_plugins.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)
from ckpt_plugins.formats import (
    SUPPORTED_FORMATS,
    describe,
    detect_format,
    list_foreign_checkpoints,
    read_foreign,
    read_safetensors_metadata,
)

# --------------------------------------------------------------------------- helpers


class _Hostile:
    """Unpickling this creates ``marker``: proof that pickle code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _Config:
    """A harmless custom class: still outside the allow-list."""

    def __init__(self) -> None:
        self.depth = 3


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


# --------------------------------------------------------------------------- real fixtures


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory) -> Path:
    """A .ckpt from a real 2-step Lightning fit (hparams: int, float, Path)."""
    L = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader, TensorDataset

    class TinyModule(L.LightningModule):
        def __init__(self, hidden: int = 4, lr: float = 0.1, data_dir: Path = Path("data")):
            super().__init__()
            self.save_hyperparameters()
            self.layer = torch.nn.Linear(3, hidden)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}

    root = tmp_path_factory.mktemp("lightning")
    L.seed_everything(0, verbose=False)
    data = DataLoader(TensorDataset(torch.randn(8, 3)), batch_size=2)
    trainer = L.Trainer(
        max_steps=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        default_root_dir=root,
        accelerator="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TinyModule(), data)
    (ckpt,) = (root / "checkpoints").glob("*.ckpt")
    return ckpt


class _TokenData(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    GPT2Config, GPT2LMHeadModel = transformers.GPT2Config, transformers.GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    return GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def hf_offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory, hf_offline) -> Path:
    """checkpoint-2/ from a real 2-step transformers.Trainer run on CPU."""
    transformers = pytest.importorskip("transformers")
    Trainer, TrainingArguments = transformers.Trainer, transformers.TrainingArguments

    out = tmp_path_factory.mktemp("hf")
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=2,
        save_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        logging_strategy="no",
    )
    Trainer(model=_tiny_gpt2(), args=args, train_dataset=_TokenData()).train()
    return out / "checkpoint-2"


@pytest.fixture(scope="module")
def pretrained_dirs(tmp_path_factory, hf_offline) -> dict:
    """save_pretrained folders: single file, sharded safetensors, sharded .bin, PEFT adapter."""
    peft = pytest.importorskip("peft")

    root = tmp_path_factory.mktemp("pretrained")
    model = _tiny_gpt2()
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    # transformers 5 writes only safetensors; build the older .bin layout by hand.
    bin_dir = root / "bin_sharded"
    bin_dir.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    shards = {
        "pytorch_model-00001-of-00002.bin": names[::2],
        "pytorch_model-00002-of-00002.bin": names[1::2],
    }
    weight_map = {}
    for shard, keys in shards.items():
        torch.save({k: state[k] for k in keys}, bin_dir / shard)
        weight_map.update({k: shard for k in keys})
    (bin_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    peft_model = peft.get_peft_model(_tiny_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    peft_model.save_pretrained(root / "lora")
    return {
        "single": root / "single",
        "sharded": root / "sharded",
        "bin_sharded": bin_dir,
        "lora": root / "lora",
        "state": state,
    }


@pytest.fixture()
def dcp_dir(tmp_path) -> Path:
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    state = {"model": {"w": torch.randn(2, 3)}, "step": 3}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is ... uninitialized": expected
        dcp.save(state, checkpoint_id=tmp_path / "dcp")
    return tmp_path / "dcp"


# --------------------------------------------------------------------------- detect_format


def test_detect_format_names_each_layout(tmp_path, lightning_ckpt, hf_checkpoint, dcp_dir, pretrained_dirs):
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "manifest.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    for name in ("a.pt", "a.pth", "a.bin", "a.safetensors", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    expected = {
        tmp_path / "ours": "ckpt_plugins",
        dcp_dir: "dcp",
        hf_checkpoint: "hf",
        pretrained_dirs["sharded"]: "hf",
        pretrained_dirs["bin_sharded"]: "hf",
        pretrained_dirs["lora"]: "hf",
        lightning_ckpt: "lightning",
        tmp_path / "a.pt": "torch",
        tmp_path / "a.pth": "torch",
        tmp_path / "a.bin": "torch",
        tmp_path / "a.safetensors": "safetensors",
        tmp_path / "notes.txt": None,
        tmp_path / "empty": None,
        tmp_path / "missing.pt": "torch",  # detection looks at names only
    }
    assert {p: detect_format(p) for p in expected} == expected


# --------------------------------------------------------------------------- lightning


def test_lightning_ckpt_loads_safely_with_everything_lightning_saved(lightning_ckpt):
    ckpt = read_foreign(lightning_ckpt)
    for key in (
        "state_dict",
        "optimizer_states",
        "lr_schedulers",
        "epoch",
        "global_step",
        "loops",
        "callbacks",
        "hyper_parameters",
    ):
        assert key in ckpt
    assert ckpt["global_step"] == 2
    assert sorted(ckpt["state_dict"]) == ["layer.bias", "layer.weight"]
    assert ckpt["hyper_parameters"] == {"hidden": 4, "lr": 0.1, "data_dir": Path("data")}
    momentum = ckpt["optimizer_states"][0]["state"][0]["momentum_buffer"]
    assert momentum.shape == ckpt["state_dict"]["layer.weight"].shape
    # Same content as Lightning's own (full pickle) load.
    full = torch.load(lightning_ckpt, weights_only=False)
    _assert_same_tensors(ckpt["state_dict"], full["state_dict"])
    assert ckpt["lr_schedulers"] == full["lr_schedulers"]


def test_lightning_include_keeps_only_selected_leaves(lightning_ckpt):
    ckpt = read_foreign(lightning_ckpt, include=lambda k: k == "state_dict.layer.weight" or k == "global_step")
    assert ckpt == {"state_dict": {"layer.weight": ckpt["state_dict"]["layer.weight"]}, "global_step": 2}


# --------------------------------------------------------------------------- hf


def test_hf_trainer_checkpoint(hf_checkpoint):
    state = read_foreign(hf_checkpoint)
    assert sorted(state) == ["model", "optimizer", "rng_state", "scheduler", "trainer_state"]
    assert (hf_checkpoint / "training_args.bin").exists()  # present on disk, never unpickled
    assert state["trainer_state"]["global_step"] == 2
    assert "transformer.wte.weight" in state["model"]
    assert all(isinstance(v, torch.Tensor) for v in state["model"].values())
    assert len(state["optimizer"]["state"]) > 0
    assert state["scheduler"]["last_epoch"] == 2
    numpy_rng = state["rng_state"]["numpy"]
    assert numpy_rng[0] == "MT19937" and numpy_rng[1].dtype == np.uint32
    assert isinstance(state["rng_state"]["cpu"], torch.Tensor)


def test_hf_include_reads_only_selected_parts(hf_checkpoint):
    state = read_foreign(
        hf_checkpoint,
        include=lambda k: k.startswith("model.transformer.h.0.") or k == "trainer_state.global_step",
    )
    assert sorted(state) == ["model", "trainer_state"]
    assert state["trainer_state"] == {"global_step": 2}
    assert state["model"] and all(k.startswith("transformer.h.0.") for k in state["model"])


def test_hf_rng_state_per_rank(tmp_path, hf_checkpoint):
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    shutil.copy(hf_checkpoint / "trainer_state.json", folder)
    for rank in (1, 0):
        shutil.copy(hf_checkpoint / "rng_state.pth", folder / f"rng_state_{rank}.pth")
    state = read_foreign(folder)
    assert list(state["rng_state"]) == [0, 1]
    assert state["rng_state"][1]["numpy"][1].dtype == np.uint32


@pytest.mark.parametrize("layout", ["sharded", "bin_sharded"])
def test_hf_sharded_weights_merge_into_one_dict(pretrained_dirs, layout):
    single = read_foreign(pretrained_dirs["single"])["model"]
    assert len(list(pretrained_dirs["sharded"].glob("model-*.safetensors"))) > 1
    merged = read_foreign(pretrained_dirs[layout])
    assert sorted(merged) == ["model"]
    if layout == "bin_sharded":  # the .bin state dict also holds the tied lm_head.weight
        single = dict(single, **{"lm_head.weight": pretrained_dirs["state"]["lm_head.weight"]})
    _assert_same_tensors(merged["model"], single)


def test_hf_missing_shard_is_corrupt(tmp_path, pretrained_dirs):
    folder = tmp_path / "sharded"
    shutil.copytree(pretrained_dirs["sharded"], folder)
    victim = sorted(folder.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CorruptCheckpointError, match=victim.name):
        read_foreign(folder)


def test_hf_peft_adapter(tmp_path, pretrained_dirs):
    state = read_foreign(pretrained_dirs["lora"])
    assert sorted(state) == ["adapter"]
    assert state["adapter"] and all("lora_" in k for k in state["adapter"])
    # The older pickle layout of the same adapter.
    (tmp_path / "lora_bin").mkdir()
    torch.save(state["adapter"], tmp_path / "lora_bin" / "adapter_model.bin")
    assert detect_format(tmp_path / "lora_bin") == "hf"
    _assert_same_tensors(read_foreign(tmp_path / "lora_bin")["adapter"], state["adapter"])


# --------------------------------------------------------------------------- torch, safetensors


def test_torch_file_returns_the_saved_object(tmp_path):
    torch.manual_seed(0)
    obj = {"w": torch.randn(3, 2), "step": 5, "groups": [{"lr": 0.1}], "pair": (1, "a")}
    torch.save(obj, tmp_path / "zip.pt")
    torch.save(obj, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)  # no mmap
    for name in ("zip.pt", "legacy.pth"):
        loaded = read_foreign(tmp_path / name)
        assert loaded.keys() == obj.keys() and loaded["groups"] == obj["groups"]
        assert loaded["pair"] == (1, "a")
        torch.testing.assert_close(loaded["w"], obj["w"])


def test_torch_file_include(tmp_path):
    torch.save({"a": {"w": torch.ones(2), "b": torch.zeros(2)}, "c": [torch.ones(1)]}, tmp_path / "x.pt")
    loaded = read_foreign(tmp_path / "x.pt", include=lambda k: k in ("a.w", "c.0"))
    assert sorted(loaded) == ["a", "c"]
    assert sorted(loaded["a"]) == ["w"] and len(loaded["c"]) == 1
    assert read_foreign(tmp_path / "x.pt", include=lambda k: False) == {}


def test_safetensors_file_and_metadata(tmp_path):
    torch.manual_seed(0)
    tensors = {"a.weight": torch.randn(4, 4), "b": torch.arange(3)}
    save_file(tensors, tmp_path / "w.safetensors", metadata={"step": "7", "format": "pt"})
    _assert_same_tensors(read_foreign(tmp_path / "w.safetensors"), tensors)
    assert read_safetensors_metadata(tmp_path / "w.safetensors") == {"step": "7", "format": "pt"}
    save_file(tensors, tmp_path / "plain.safetensors")
    assert read_safetensors_metadata(tmp_path / "plain.safetensors") == {}


def test_safetensors_include_reads_only_selected_tensors(tmp_path, monkeypatch):
    names = [f"layer.{i}.weight" for i in range(6)]
    save_file({n: torch.full((2,), float(i)) for i, n in enumerate(names)}, tmp_path / "w.safetensors")
    read_names: list[str] = []
    real_safe_open = safetensors_module.safe_open

    class SpyHandle:
        def __init__(self, handle):
            self.handle = handle

        def keys(self):
            return self.handle.keys()

        def get_tensor(self, name):
            read_names.append(name)
            return self.handle.get_tensor(name)

    class SpyOpen:
        def __init__(self, *args, **kwargs):
            self.ctx = real_safe_open(*args, **kwargs)

        def __enter__(self):
            return SpyHandle(self.ctx.__enter__())

        def __exit__(self, *exc):
            return self.ctx.__exit__(*exc)

    monkeypatch.setattr(safetensors_module, "safe_open", SpyOpen)
    state = read_foreign(tmp_path / "w.safetensors", include=lambda k: k.startswith("layer.2."))
    assert list(state) == ["layer.2.weight"]
    assert read_names == ["layer.2.weight"]
    torch.testing.assert_close(state["layer.2.weight"], torch.full((2,), 2.0))


def test_safetensors_rejects_a_callable_map_location(tmp_path):
    save_file({"a": torch.zeros(1)}, tmp_path / "w.safetensors")
    with pytest.raises(ConfigError, match="map_location"):
        read_foreign(tmp_path / "w.safetensors", map_location=lambda storage, loc: storage)


# --------------------------------------------------------------------------- dcp


def test_dcp_reads_without_pickle_code(dcp_dir):
    state = read_foreign(dcp_dir)  # the safe reader: no opt-in needed (tests/formats/test_dcp.py)
    torch.manual_seed(0)
    assert torch.equal(state["model"]["w"], torch.randn(2, 3))
    assert state["step"] == 3


# --------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(CheckpointNotFoundError, match="nope.ckpt"):
        read_foreign(missing)


def test_unknown_format_lists_supported(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="notes.txt") as info:
        read_foreign(tmp_path / "notes.txt")
    for fmt in SUPPORTED_FORMATS:
        assert fmt in str(info.value)


def test_own_format_is_pointed_elsewhere(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match="ckpt_plugins checkpoint"):
        read_foreign(tmp_path)


def _truncated_copy(tmp_path: Path, source: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copy(source, target)
    _truncate(target)
    return target


def test_truncated_files_are_corrupt(tmp_path, lightning_ckpt, hf_checkpoint):
    torch.save({"w": torch.zeros(100, 100)}, tmp_path / "src.pt")
    torch.save({"w": torch.zeros(100, 100)}, tmp_path / "src.pth", _use_new_zipfile_serialization=False)
    save_file({"w": torch.zeros(100, 100)}, tmp_path / "src.safetensors")
    victims = [
        _truncated_copy(tmp_path, tmp_path / "src.pt", "cut.pt"),
        _truncated_copy(tmp_path, tmp_path / "src.pth", "cut_legacy.pth"),
        _truncated_copy(tmp_path, tmp_path / "src.safetensors", "cut.safetensors"),
        _truncated_copy(tmp_path, lightning_ckpt, "cut.ckpt"),
    ]
    for victim in victims:
        with pytest.raises(CorruptCheckpointError, match=victim.name):
            read_foreign(victim)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_truncated_file_in_hf_folder_is_corrupt(tmp_path, hf_checkpoint, name):
    folder = tmp_path / "checkpoint-2"
    shutil.copytree(hf_checkpoint, folder)
    _truncate(folder / name)
    with pytest.raises(CorruptCheckpointError, match=name):
        read_foreign(folder)


def test_custom_class_is_refused_and_named(tmp_path):
    torch.save({"cfg": _Config(), "w": torch.zeros(1)}, tmp_path / "cfg.pt")
    with pytest.raises(UnsafeCheckpointError) as info:
        read_foreign(tmp_path / "cfg.pt")
    message = str(info.value)
    for part in ("cfg.pt", "_Config", "allow_unsafe_pickle=True", "add_safe_globals"):
        assert part in message
    assert isinstance(read_foreign(tmp_path / "cfg.pt", allow_unsafe_pickle=True)["cfg"], _Config)


# --------------------------------------------------------------------------- hostile pickles


def _hostile_pt(tmp_path: Path, marker: Path) -> Path:
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "payload": _Hostile(marker)}, path)
    return path


def _hostile_ckpt(tmp_path: Path, marker: Path, lightning_ckpt: Path) -> Path:
    ckpt = torch.load(lightning_ckpt, weights_only=False)
    ckpt["callbacks"]["Evil"] = {"state": _Hostile(marker)}
    path = tmp_path / "epoch=0-step=2.ckpt"
    torch.save(ckpt, path)
    return path


def _hostile_hf(tmp_path: Path, marker: Path, hf_checkpoint: Path) -> Path:
    folder = tmp_path / "checkpoint-2"
    shutil.copytree(hf_checkpoint, folder)
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
    optimizer["payload"] = _Hostile(marker)
    torch.save(optimizer, folder / "optimizer.pt")
    return folder


@pytest.mark.parametrize("kind", ["pt", "ckpt", "hf"])
def test_hostile_pickle_is_refused_and_never_runs(tmp_path, lightning_ckpt, hf_checkpoint, kind):
    marker = tmp_path / "PWNED"
    path, named = {
        "pt": lambda: (_hostile_pt(tmp_path, marker), "evil.pt"),
        "ckpt": lambda: (_hostile_ckpt(tmp_path, marker, lightning_ckpt), "epoch=0-step=2.ckpt"),
        "hf": lambda: (_hostile_hf(tmp_path, marker, hf_checkpoint), "optimizer.pt"),
    }[kind]()
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError) as info:
        read_foreign(path)
    assert named in str(info.value) and "open" in str(info.value)
    assert "allow_unsafe_pickle=True" in str(info.value)
    with pytest.raises(UnsafeCheckpointError):  # include does not bypass the check
        read_foreign(path, include=lambda k: False)
    assert not marker.exists()


def test_hostile_payload_is_live_under_full_pickle(tmp_path):
    """Guards the test above: the same payload does run once the caller opts in."""
    marker = tmp_path / "PWNED"
    loaded = read_foreign(_hostile_pt(tmp_path, marker), allow_unsafe_pickle=True)
    loaded["payload"].close()
    assert marker.exists()


# --------------------------------------------------------------------------- listing, describe


def test_list_foreign_checkpoints_in_natural_order(tmp_path, hf_checkpoint):
    for step in (10, 9, 100):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    for name in (
        "epoch=10-step=5.ckpt",
        "epoch=2-step=100.ckpt",
        "model_10.pt",
        "model_9.pt",
        "w.safetensors",
        "notes.txt",
        ".hidden.ckpt",
    ):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "logs").mkdir()
    names = [os.path.basename(p) for p in list_foreign_checkpoints(tmp_path)]
    assert names == [
        "checkpoint-9",
        "checkpoint-10",
        "checkpoint-100",
        "epoch=2-step=100.ckpt",
        "epoch=10-step=5.ckpt",
        "model_9.pt",
        "model_10.pt",
        "w.safetensors",
    ]
    assert list_foreign_checkpoints(hf_checkpoint.parent) == [str(hf_checkpoint)]
    with pytest.raises(CheckpointNotFoundError, match="missing"):
        list_foreign_checkpoints(tmp_path / "missing")


def test_describe_lists_every_leaf():
    state = {
        "w": torch.zeros(2, 3),
        "h": torch.zeros(4, dtype=torch.float16),
        "rng": np.zeros(5, dtype=np.uint32),
        "step": 7,
        "groups": [{"lr": 0.1, "name": None}],
        "pair": ("a", torch.tensor(1)),
        "empty": {},
    }
    assert describe(state) == [
        ("w", "(2, 3)", "float32", 24),
        ("h", "(4,)", "float16", 8),
        ("rng", "(5,)", "uint32", 20),
        ("step", "", "int", 0),
        ("groups.0.lr", "", "float", 0),
        ("groups.0.name", "", "NoneType", 0),
        ("pair.0", "", "str", 0),
        ("pair.1", "()", "int64", 8),
        ("empty", "", "dict", 0),
    ]


def test_describe_a_real_hf_checkpoint(hf_checkpoint):
    rows = describe(read_foreign(hf_checkpoint, include=lambda k: k.startswith("model.")))
    assert rows and all(path.startswith("model.") and nbytes > 0 for path, _, _, nbytes in rows)


def test_import_needs_no_framework():
    """The readers never import Lightning or transformers (they are optional extras)."""
    code = (
        "import sys, ckpt_plugins.formats; "
        "print(sorted(m for m in ('lightning', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
