"""The one compiled part: ``ckpt_plugins.persist._stream_copy`` (streaming-store byte copies).

Optional: where it does not compile, the install goes on without it and the copies use
``memmove`` (``ckpt_plugins.persist.hashed_copy``). Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ckpt_plugins.persist._stream_copy",
            ["ckpt_plugins/persist/_stream_copy.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
