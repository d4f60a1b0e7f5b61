"""The files of a checkpoint: tensor files (safetensors, streamed, checksummed), the manifest,
and extra files (a framework's native files committed with the checkpoint)."""
