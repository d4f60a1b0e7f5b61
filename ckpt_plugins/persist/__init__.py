"""Persisting a save: the stager (reused host buffers), the engine (one ordered background
writer with handles), the save job (write, commit, retain), the writer process, and exit hooks."""
