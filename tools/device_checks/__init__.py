"""The pieces of ``tools/device_run.py``, the one prepared script for a device call: records written as each check
ends, the environment and import check, the one-step GPU-vs-host comparison, the reference PyTorch timing and the
top-ops table of a trace. Each piece that must not share the parent's process (the GPU's allocator, torch) runs
as ``python -m tools.device_checks.NAME`` and prints one JSON line."""
