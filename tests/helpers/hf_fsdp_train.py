"""A real ``transformers.Trainer`` whose model is FSDP2 (``fully_shard``, DTensor parameters), in
one CPU process (a gloo group of one): the callback saves it through the sharded path and the
Trainer resumes from the sharded ``checkpoint-N`` through the wrapped loaders (ckpt_plugins.hf.fsdp).

    python tests/helpers/hf_fsdp_train.py OUT --steps 6 [--resume CKPT] [--best] --final weights.safetensors

accelerate itself does not shard on CPU (docs/sharded.md); the model is sharded here before the
Trainer gets it, so the Trainer holds exactly the state accelerate's FSDP2 would give it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from hf_train import TokenDataset, build_model, training_args
from ports import free_port


def sharded_model():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build_model("gpt2")
    mesh = init_device_mesh("cpu", (1,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--resume")
    parser.add_argument("--final", required=True)
    parser.add_argument("--best", action="store_true", help="evaluate every 2 steps, load_best_model_at_end")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import Trainer

    from ckpt_plugins.hf import CheckpointCallback

    model = sharded_model()
    best = {}
    if opts.best:  # the lowest eval loss is the first evaluation's here (3.907 at step 2, 3.909 at 4)
        best = dict(eval_strategy="steps", eval_steps=2, load_best_model_at_end=True)
    trainer = Trainer(
        model=model,
        args=training_args(opts.out, opts.steps, save_steps=2, **best),
        train_dataset=TokenDataset(48),
        eval_dataset=TokenDataset(8, seed=3) if opts.best else None,
        callbacks=[CheckpointCallback(async_save=False)],
    )
    trainer.train(resume_from_checkpoint=opts.resume)
    full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    save_file({k: v.detach().clone().contiguous() for k, v in full.items()}, opts.final)
    print(f"STEP {trainer.state.global_step} SHARDED {type(next(trainer.model.parameters())).__name__}", flush=True)
    print(f"BEST {trainer.state.best_model_checkpoint}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
