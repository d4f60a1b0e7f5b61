"""Tests for ckpt_plugins.activation: config, targets, every mode's gradients, names, guards.

Three models: a GPT-2 from transformers (built from config, never downloaded), a hand-written
GPT-style model (``nn.ModuleList`` of blocks, SDPA attention) and a plain MLP stack
(``nn.Sequential`` of Linear/GELU/Dropout blocks), all with dropout on.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ckpt_plugins.activation import (
    SELECTIVE_SAVE_OPS,
    ActivationCheckpointing,
    ActivationCheckpointingReport,
    ActivationCheckpointingWarning,
    activation_checkpointing_report,
    apply_activation_checkpointing,
    remove_activation_checkpointing,
)
from ckpt_plugins.activation.config import MODE_NAMES
from ckpt_plugins.activation.modes import MODES, _OffloadToHost
from ckpt_plugins.activation.targets import find_blocks
from ckpt_plugins.activation.wrapper import CheckpointedForward, wrapped_by
from ckpt_plugins.errors import ConfigError
from conftest import ROOT

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = ROOT
VOCAB, SEQ = 128, 32
RECOMPUTING = ["full", "every_n", "selective"]
ALL_MODES = [*RECOMPUTING, "offload"]


# --------------------------------------------------------------------------- models


class Block(nn.Module):
    """A GPT block: pre-LN attention (SDPA, causal, dropout) and MLP, residuals, dropout."""

    def __init__(self, dim: int = 64, heads: int = 4, p: float = 0.1) -> None:
        super().__init__()
        self.heads, self.p = heads, p
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.mlp(self.ln2(x)))


class TinyGPT(nn.Module):
    def __init__(self, layers: int = 4, dim: int = 64) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, dim), nn.Embedding(SEQ, dim)
        self.drop = nn.Dropout(0.1)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(dim), nn.Linear(dim, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok(ids) + self.pos(torch.arange(ids.shape[1])))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def tiny_gpt() -> nn.Module:
    torch.manual_seed(0)
    return TinyGPT()


def mlp_stack() -> nn.Module:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Dropout(0.1)) for _ in range(4)]
    return nn.Sequential(*blocks, nn.Linear(32, 1))


def gpt2(**overrides) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = dict(
        n_layer=4,
        n_embd=64,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=64,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(GPT2Config(**{**config, **overrides}))


BUILDERS = {"gpt2": gpt2, "tiny_gpt": tiny_gpt, "mlp": mlp_stack}
EXPECTED_BLOCKS = {
    "gpt2": [f"transformer.h.{i}" for i in range(4)],
    "tiny_gpt": [f"blocks.{i}" for i in range(4)],
    "mlp": ["0", "1", "2", "3"],
}


def batch_for(name: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if name == "mlp":
        return torch.randn(8, 32, generator=gen)
    return torch.randint(0, VOCAB, (2, SEQ), generator=gen)


def loss_of(name: str, model: nn.Module, batch: torch.Tensor, **kwargs) -> torch.Tensor:
    torch.manual_seed(1234)  # same dropout masks in every run
    if name == "gpt2":
        return model(batch, labels=batch, **kwargs).loss
    if name == "tiny_gpt":
        logits = model(batch)
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
    return model(batch).pow(2).mean()


def grads_of(name: str, model: nn.Module, **kwargs) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss_of(name, model, batch_for(name), **kwargs).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ActivationCheckpointingWarning)
        yield


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def backward_op_counts(name: str, model: nn.Module) -> dict[str, int]:
    model.train()
    loss = loss_of(name, model, batch_for(name))
    with OpCounter() as counter:
        loss.backward()
    return counter.counts


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "value, expected",
    [
        (True, ActivationCheckpointing(mode="full")),
        (False, ActivationCheckpointing(mode="off")),
        (None, ActivationCheckpointing(mode="off")),
        ("selective", ActivationCheckpointing(mode="selective")),
        (" Every_N ", ActivationCheckpointing(mode="every_n")),
        ({}, ActivationCheckpointing()),
        (
            {"mode": "every_n", "every_n": 3, "targets": ["Block"]},
            ActivationCheckpointing(mode="every_n", every_n=3, targets=["Block"]),
        ),
        ({"mode": "offload", "offload_pin_memory": "auto"}, ActivationCheckpointing(mode="offload")),
        (
            {"mode": "offload", "offload_pin_memory": False},
            ActivationCheckpointing(mode="offload", offload_pin_memory=False),
        ),
    ],
)
def test_from_value(value, expected):
    assert ActivationCheckpointing.from_value(value) == expected


def test_from_value_returns_instances_unchanged():
    config = ActivationCheckpointing(mode="selective", targets="Block")
    assert ActivationCheckpointing.from_value(config) is config


@pytest.mark.parametrize(
    "value, message",
    [
        (
            {"mdoe": "full"},
            r"no option 'mdoe'; valid options are mode, targets, every_n, "
            r"preserve_rng_state, offload_pin_memory",
        ),
        (
            "fast",
            r"mode 'fast' is not valid; use one of 'full', 'every_n', 'selective', 'offload', "
            r"'off'",
        ),
        ({"mode": "partial"}, r"mode 'partial' is not valid; use one of 'full'"),
        ({"every_n": 0}, r"every_n=0 is not valid; use an integer >= 1"),
        ({"every_n": True}, r"every_n=True is not valid"),
        ({"targets": ""}, r"targets='' is empty"),
        ({"targets": ["auto", "Block"]}, r"mixes 'auto' with patterns"),
        ({"targets": 3}, r"targets=3 is not valid"),
        ({"offload_pin_memory": "yes"}, r"offload_pin_memory='yes' is not valid"),
        ({"preserve_rng_state": "no"}, r"preserve_rng_state='no' is not valid"),
        (3.5, r"value 3.5 of type float is not valid"),
    ],
)
def test_bad_values_raise_config_error_naming_them(value, message):
    with pytest.raises(ConfigError, match=message):
        ActivationCheckpointing.from_value(value)


def test_comma_separated_targets_become_patterns():
    config = ActivationCheckpointing(targets="Block, layers.*")
    assert config.target_patterns() == ("Block", "layers.*")
    assert ActivationCheckpointing(targets=["a,b", "c"]).target_patterns() == ("a", "b", "c")
    assert ActivationCheckpointing().target_patterns() is None


def test_every_mode_name_has_one_class():
    assert set(MODES) == set(MODE_NAMES)
    assert all(cls.name == name for name, cls in MODES.items())


def test_config_builds_from_yaml_with_jsonargparse():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--gradient_checkpointing", type=ActivationCheckpointing)
    cfg = parser.parse_string("gradient_checkpointing: {mode: every_n, targets: [GPT2Block], every_n: 3}")
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # before 4.49
    built = instantiate(cfg).gradient_checkpointing
    assert built == ActivationCheckpointing(mode="every_n", targets=["GPT2Block"], every_n=3)


def test_config_builds_from_command_line_with_hf_argument_parser():
    transformers = pytest.importorskip("transformers")
    parser = transformers.HfArgumentParser(ActivationCheckpointing)
    (built,) = parser.parse_args_into_dataclasses(
        ["--mode", "selective", "--targets", "GPT2Block", "--offload_pin_memory", "false"]
    )
    assert built.mode == "selective" and built.target_patterns() == ("GPT2Block",)
    assert built.offload_pin_memory is False


# --------------------------------------------------------------------------- targets


@pytest.mark.parametrize("name", BUILDERS)
def test_auto_targets_find_the_repeated_blocks(name):
    blocks = find_blocks(BUILDERS[name](), None)
    assert [path for path, _ in blocks] == EXPECTED_BLOCKS[name]


def test_targets_by_class_name_and_glob_keep_the_outermost():
    model = tiny_gpt()
    by_class = find_blocks(model, ("Block",))
    by_glob = find_blocks(model, ("blocks.*",))  # also matches blocks.0.ln1 ...: nested, dropped
    assert [p for p, _ in by_class] == [p for p, _ in by_glob] == EXPECTED_BLOCKS["tiny_gpt"]
    assert [p for p, _ in find_blocks(model, ("blocks.[13]", "Block"))] == EXPECTED_BLOCKS["tiny_gpt"]
    assert [p for p, _ in find_blocks(model, ("blocks.?.mlp",))] == [f"blocks.{i}.mlp" for i in range(4)]


def test_unmatched_target_lists_the_classes():
    with pytest.raises(
        ConfigError,
        match=r"target 'Layer' matched no module of TinyGPT; use a "
        r"class name among Block, Dropout, Embedding",
    ):
        apply_activation_checkpointing(tiny_gpt(), {"targets": "Layer"})


def test_auto_without_repeated_blocks_says_what_to_do():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ConfigError, match=r"found no repeated blocks in Sequential.*set targets"):
        apply_activation_checkpointing(model)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("name", BUILDERS)
def test_gradients_match_no_checkpointing(name, mode, quiet):
    """Exact equality: same ops on the same values, dropout masks replayed by the RNG stash."""
    reference = grads_of(name, BUILDERS[name]())
    model = BUILDERS[name]()
    apply_activation_checkpointing(model, {"mode": mode})
    grads = grads_of(name, model)
    assert grads.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(grads[key], reference[key], rtol=0, atol=0, msg=key)


def test_gradients_match_when_hf_model_is_wrapped_instead_of_native(quiet):
    reference = grads_of("gpt2", gpt2())
    for mode in RECOMPUTING:
        model = gpt2()
        report = apply_activation_checkpointing(model, {"mode": mode, "targets": "GPT2Block"})
        assert report.mechanism == "wrap"
        grads = grads_of("gpt2", model)
        for key in reference:
            torch.testing.assert_close(grads[key], reference[key], rtol=0, atol=0, msg=key)


def test_without_rng_preservation_dropout_differs(quiet):
    """The control for the tests above: preserve_rng_state is what makes dropout replay."""
    reference = grads_of("mlp", mlp_stack())
    model = mlp_stack()
    apply_activation_checkpointing(model, {"mode": "full", "preserve_rng_state": False})
    grads = grads_of("mlp", model)
    assert not all(torch.equal(grads[k], reference[k]) for k in reference)


@pytest.mark.parametrize("name", ["mlp", "tiny_gpt"])
def test_modes_recompute_what_they_promise(name, quiet):
    """full recomputes matmuls in backward; selective only the pointwise ops; offload nothing."""
    matmuls = ("addmm", "mm", "bmm")

    def recomputed(mode: str) -> dict[str, int]:
        model = BUILDERS[name]()
        apply_activation_checkpointing(model, mode)
        return backward_op_counts(name, model)

    off, full, selective, offload = (recomputed(m) for m in ("off", "full", "selective", "offload"))
    forward_ops = {"addmm", "gelu"}
    assert all(off.get(op, 0) == 0 for op in forward_ops)  # no forward ops in backward
    assert full.get("addmm", 0) > 0 and full.get("gelu", 0) > 0  # whole block again
    assert selective.get("gelu", 0) == full["gelu"]  # pointwise recomputed
    assert selective.get("addmm", 0) == 0  # matmul outputs kept
    assert sum(selective.get(op, 0) for op in matmuls) == sum(off.get(op, 0) for op in matmuls)
    ignore = {"detach"}  # saved-tensor hooks unpack through extra detaches
    assert {k: v for k, v in offload.items() if k not in ignore} == {k: v for k, v in off.items() if k not in ignore}


def test_every_n_checkpoints_blocks_0_n_2n(quiet):
    model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(7)])
    report = apply_activation_checkpointing(model, {"mode": "every_n", "every_n": 3})
    assert [w.path for w in report.wrapped] == ["0", "3", "6"]
    assert report.skipped == ("1", "2", "4", "5")
    hf_report = apply_activation_checkpointing(gpt2(), {"mode": "every_n", "every_n": 3})
    assert hf_report.mechanism == "hf"
    assert [w.path for w in hf_report.wrapped] == ["transformer.h.0", "transformer.h.3"]


def test_use_reentrant_false_is_always_passed(monkeypatch, quiet):
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def spy(fn, *args, **kwargs):
        calls.append(kwargs)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    for mode in RECOMPUTING:
        model = tiny_gpt()
        apply_activation_checkpointing(model, mode)
        grads_of("tiny_gpt", model)
    assert calls and all(c["use_reentrant"] is False and c["preserve_rng_state"] is True for c in calls)

    model = gpt2()
    apply_activation_checkpointing(model, "selective")
    func = model.transformer.h[0]._gradient_checkpointing_func
    assert func.keywords["use_reentrant"] is False and "context_fn" in func.keywords


def test_selective_policy_keeps_matmuls_and_attention():
    names = {op.overloadpacket.__name__ for op in SELECTIVE_SAVE_OPS}
    assert {
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
    } <= names
    assert not names & {"gelu", "native_layer_norm", "add", "mul", "bernoulli_", "_softmax"}


def test_no_grad_and_eval_run_the_block_plainly(quiet):
    model, reference = tiny_gpt(), tiny_gpt()
    apply_activation_checkpointing(model, "selective")
    model.eval(), reference.eval()
    ids = batch_for("tiny_gpt")
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))
    assert torch.equal(model(ids), reference(ids))


def test_offload_hooks_leave_cpu_tensors_and_parameters_in_place():
    hooks = _OffloadToHost(pin_memory=False, keep=frozenset())
    t = torch.randn(3)
    assert hooks.pack_hook(t) == (None, t)
    param = nn.Parameter(torch.randn(2))
    assert hooks.pack_hook(param)[1] is param


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_moves_saved_activations_off_the_gpu(quiet):
    model = mlp_stack().cuda()
    x = torch.randn(512, 32, device="cuda")
    before = torch.cuda.memory_allocated()
    out = model(x).sum()
    plain = torch.cuda.memory_allocated() - before
    del out
    report = apply_activation_checkpointing(model, "offload")
    assert "pin_memory=True" in report.wrapped[0].how
    before = torch.cuda.memory_allocated()
    out = model(x).sum()
    assert torch.cuda.memory_allocated() - before < plain / 2
    out.backward()


# --------------------------------------------------------------------------- names, state


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("name", BUILDERS)
def test_names_and_state_dict_keys_do_not_change(name, mode, quiet):
    plain, model = BUILDERS[name](), BUILDERS[name]()
    keys = list(model.state_dict().keys())
    params = [n for n, _ in model.named_parameters()]
    apply_activation_checkpointing(model, mode)
    assert list(model.state_dict().keys()) == keys
    assert [n for n, _ in model.named_parameters()] == params
    model.load_state_dict(plain.state_dict(), strict=True)  # saved without AC, loaded with
    for p in model.parameters():
        p.data.add_(1.0)
    plain.load_state_dict(model.state_dict(), strict=True)  # saved with AC, loaded without
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values(), strict=True))


def test_applying_twice_is_a_no_op_and_a_different_config_is_refused(quiet):
    model = tiny_gpt()
    first = apply_activation_checkpointing(model, {"mode": "full"})
    forwards = [b.__dict__["forward"] for b in model.blocks]
    again = apply_activation_checkpointing(model, ActivationCheckpointing(mode="full"))
    assert again.already_applied and not first.already_applied
    assert again.wrapped == first.wrapped and "already applied" in str(again)
    assert [b.__dict__["forward"] for b in model.blocks] == forwards
    assert not isinstance(forwards[0].original, CheckpointedForward)
    with pytest.raises(
        ConfigError,
        match=r"already applied to TinyGPT with .*mode='full'.*; call "
        r"remove_activation_checkpointing\(model\) before applying",
    ):
        apply_activation_checkpointing(model, "selective")
    assert activation_checkpointing_report(model) == first


@pytest.mark.parametrize("mode", ALL_MODES)
def test_remove_restores_the_model(mode, quiet):
    model = tiny_gpt()
    report = apply_activation_checkpointing(model, mode)
    wrapped = {w.path for w in report.wrapped}
    assert [wrapped_by(b) is not None for b in model.blocks] == [f"blocks.{i}" in wrapped for i in range(4)]
    assert remove_activation_checkpointing(model) is True
    assert all("forward" not in b.__dict__ for b in model.blocks)
    assert activation_checkpointing_report(model) is None
    assert remove_activation_checkpointing(model) is False
    assert backward_op_counts("tiny_gpt", model).get("addmm", 0) == 0
    apply_activation_checkpointing(model, "full")  # and it can be applied again


def test_remove_restores_a_hugging_face_model(quiet):
    model = gpt2()
    hooks_before = list(getattr(model, "_require_grads_hooks", []))
    apply_activation_checkpointing(model, "selective")
    assert model.is_activation_checkpointing and model.config.use_cache is False
    remove_activation_checkpointing(model)
    assert not model.is_activation_checkpointing
    assert model.config.use_cache is True
    assert list(getattr(model, "_require_grads_hooks", [])) == hooks_before
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_remove_keeps_an_instance_forward_that_was_there_before(quiet):
    model = mlp_stack()
    block = model[0]
    custom = block.forward
    block.forward = custom  # an instance attribute set by someone else
    apply_activation_checkpointing(model)
    assert block.__dict__["forward"].original is custom
    remove_activation_checkpointing(model)
    assert block.__dict__["forward"] is custom


def test_deepcopy_of_a_wrapped_model_uses_its_own_blocks(quiet):
    model = tiny_gpt()
    apply_activation_checkpointing(model, "full")
    clone = copy.deepcopy(model)
    assert clone.blocks[0].forward.module is clone.blocks[0]
    assert clone.blocks[0].forward.original.__self__ is clone.blocks[0]
    for p in clone.parameters():
        p.data.mul_(0.5)
    grads = grads_of("tiny_gpt", clone)
    assert all(p.grad is None for p in model.parameters())
    assert grads.keys() == {n for n, _ in clone.named_parameters()}


def test_a_failed_apply_leaves_the_model_as_it_was(monkeypatch, quiet):
    import ckpt_plugins.activation.apply as apply_module
    import ckpt_plugins.activation.hf as hf_module

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    model = gpt2()
    monkeypatch.setattr(hf_module, "enable", boom)
    with pytest.raises(RuntimeError, match="boom"):
        apply_activation_checkpointing(model, "full")
    assert model.config.use_cache is True and activation_checkpointing_report(model) is None

    model = tiny_gpt()
    real_wrap, calls = apply_module.wrap, []

    def wrap_twice_then_fail(module, mode):
        calls.append(module)
        if len(calls) > 2:
            raise RuntimeError("boom")
        return real_wrap(module, mode)

    monkeypatch.setattr(apply_module, "wrap", wrap_twice_then_fail)
    with pytest.raises(RuntimeError, match="boom"):
        apply_activation_checkpointing(model, "full")
    assert all("forward" not in b.__dict__ for b in model.blocks)
    assert activation_checkpointing_report(model) is None


def test_hf_model_that_already_checkpoints_is_not_checkpointed_twice(quiet):
    model = gpt2()
    model.activation_checkpointing_enable()
    report = apply_activation_checkpointing(model, "offload")
    assert report.mechanism == "wrap" and not model.is_activation_checkpointing
    assert any("turned it off" in n for n in report.notes)


# --------------------------------------------------------------------------- guards


def test_batchnorm_inside_a_recomputed_block_warns_with_its_path():
    model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)) for _ in range(2)])
    with pytest.warns(
        ActivationCheckpointingWarning,
        match=r"BatchNorm1d '[01]\.1' is inside checkpointed block '[01]'.*updated "
        r"twice",
    ) as record:
        report = apply_activation_checkpointing(model, "full")
    assert any("'1.1'" in n for n in report.notes)
    assert "BatchNorm1d '0.1' is inside checkpointed block '0'" in str(record[0].message)
    assert record[0].filename == __file__  # attributed to the caller, not to the library
    remove_activation_checkpointing(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ActivationCheckpointingWarning)
        apply_activation_checkpointing(model, "offload")  # nothing recomputed: no warning


def test_batchnorm_statistics_really_update_twice():
    """Documents the hazard the guard warns about."""

    def run(mode: str) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)) for _ in range(2)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ActivationCheckpointingWarning)
            apply_activation_checkpointing(model, mode)
        model(torch.randn(16, 8)).sum().backward()
        return model[0][1].num_batches_tracked

    assert run("off") == 1 and run("full") == 2


def test_use_cache_is_turned_off_with_a_warning_and_restored():
    model = gpt2()
    with pytest.warns(
        ActivationCheckpointingWarning,
        match=r"config\.use_cache was True; set "
        r"it to False",
    ):
        report = apply_activation_checkpointing(model, "full")
    assert model.config.use_cache is False
    assert any("use_cache" in n for n in report.notes)
    remove_activation_checkpointing(model)
    assert model.config.use_cache is True


def test_explicit_use_cache_while_training_is_dropped_by_the_wrapper():
    reference = grads_of("gpt2", gpt2())
    model = gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ActivationCheckpointingWarning)
        apply_activation_checkpointing(model, {"mode": "full", "targets": "GPT2Block"})
    with pytest.warns(ActivationCheckpointingWarning, match=r"KV cache or use_cache=True"):
        grads = grads_of("gpt2", model, use_cache=True)
    for key in reference:
        torch.testing.assert_close(grads[key], reference[key], rtol=0, atol=0)


def lora_gpt2():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True)
    with warnings.catch_warnings():  # peft calls transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        model = peft.get_peft_model(gpt2(), config)
    torch.manual_seed(5)  # non-zero B so every LoRA parameter gets a gradient
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)
    return model


@pytest.mark.parametrize(
    "mode, targets", [(m, "auto") for m in ALL_MODES] + [("full", "GPT2Block"), ("selective", "GPT2Block")]
)
def test_lora_with_frozen_embeddings_gets_the_same_gradients(mode, targets, quiet):
    reference = grads_of("gpt2", lora_gpt2())
    assert reference and all("lora" in k for k in reference)
    model = lora_gpt2()
    report = apply_activation_checkpointing(model, {"mode": mode, "targets": targets})
    grads = grads_of("gpt2", model)
    assert grads.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(grads[key], reference[key], rtol=0, atol=0, msg=key)
    base = model.get_base_model()
    if mode != "offload":
        assert any("frozen" in n for n in report.notes)
        assert getattr(base, "_require_grads_hooks", None)
    remove_activation_checkpointing(model)
    assert not getattr(base, "_require_grads_hooks", None)


def test_lora_wrap_path_warns_that_inputs_were_made_to_require_grad():
    model = lora_gpt2()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*config\.use_cache was True")
        with pytest.warns(
            ActivationCheckpointingWarning, match=r"frozen \(LoRA-style\); called enable_input_require_grads\(\)"
        ):
            apply_activation_checkpointing(model, {"mode": "full", "targets": "GPT2Block"})


def test_frozen_embeddings_in_a_plain_model_need_nothing(quiet):
    def frozen() -> nn.Module:
        model = tiny_gpt()
        model.tok.requires_grad_(False)
        model.pos.requires_grad_(False)
        return model

    reference = grads_of("tiny_gpt", frozen())
    model = frozen()
    report = apply_activation_checkpointing(model, "full")
    assert any("nothing changed" in n and "use_reentrant=False" in n for n in report.notes)
    grads = grads_of("tiny_gpt", model)
    assert grads.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(grads[key], reference[key], rtol=0, atol=0)


# --------------------------------------------------------------------------- report, docs


def test_report_says_what_was_wrapped_and_how(quiet):
    report = apply_activation_checkpointing(tiny_gpt(), "selective")
    assert isinstance(report, ActivationCheckpointingReport)
    assert report.mode == "selective" and report.mechanism == "wrap"
    assert [(w.path, w.class_name) for w in report.wrapped] == [(f"blocks.{i}", "Block") for i in range(4)]
    text = str(report)
    assert "mode=selective, mechanism=wrap" in text
    assert "- blocks.0 (Block): selective checkpoint (save matmul/attention outputs" in text
    assert report.to_dict()["wrapped"][0] == dataclasses.asdict(report.wrapped[0])

    hf_report = apply_activation_checkpointing(gpt2(), "full")
    assert hf_report.mechanism == "hf"
    assert hf_report.wrapped[0].how.startswith("transformers activation_checkpointing_enable")
    offload = apply_activation_checkpointing(mlp_stack(), "offload")
    assert any("CPU-only model" in n and "changes nothing" in n for n in offload.notes)
    assert apply_activation_checkpointing(mlp_stack(), False) == ActivationCheckpointingReport(
        mode="off", mechanism="none"
    )


def test_docs_examples_run(tmp_path, monkeypatch, quiet):
    text = (ROOT / "docs" / "activation.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, "docs/activation.md", "exec"), {"__name__": "docs_example"})
