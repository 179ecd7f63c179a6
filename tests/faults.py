"""Test-only fault injection through the engine's step hooks (cratemae.train.engine.STEP_HOOKS).

In-process:  faults.kill_at_step(13)  before calling the library.
Subprocess:  python tests/faults.py --kill_at_step=13 launch.train --config=... --workdir=...
             runs the launcher's main with the hook installed: the process SIGKILLs itself after step 13, once the
             checkpoint saves it started have committed (so the test knows where the rerun resumes).
"""

import importlib
import os
import pathlib
import signal
import sys


def kill_at_step(step):
    """Installs a hook that SIGKILLs this process, without any clean-up, after ``step``."""
    from cratemae.train import engine

    def hook(done, checkpointer):
        if done == step:
            checkpointer.wait_until_finished()
            os.kill(os.getpid(), signal.SIGKILL)

    engine.STEP_HOOKS.append(hook)
    return hook


def main(argv):
    """argv: ['--kill_at_step=N', 'launch.MODULE', *the launcher's flags]."""
    flag, module, *rest = argv
    if not flag.startswith('--kill_at_step='):
        raise SystemExit(f'usage: python tests/faults.py --kill_at_step=N launch.MODULE [FLAGS...]; got {argv}')
    kill_at_step(int(flag.split('=', 1)[1]))
    from launch import cli

    launcher = importlib.import_module(module)
    sys.argv = [module, *rest]
    cli.main(launcher.main, launcher.FLAGS)


if __name__ == '__main__':
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository root, for cratemae/launch
    main(sys.argv[1:])
