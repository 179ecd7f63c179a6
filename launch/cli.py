"""The one command-line convention every launcher follows.

* absl flags, each launcher on its own ``FlagValues`` (so tests can import several launchers in one process);
  flag names are spelt with underscores and accept dashes (``--dry-run`` = ``--dry_run``);
* ``--config=FILE:NAME`` (ml_collections ``config_flags``, overrides as ``--config.KEY=VALUE``); a bare registry
  name is accepted too (``--config=crate_mae_tiny`` = ``--config=experiments/registry.py:crate_mae_tiny``), and a
  relative FILE is found from the repository root when it is not under the working directory;
* ``--workdir`` names a run, ``--out`` an output;
* a usage error prints ``PROG: error: MESSAGE`` and exits with status 2 (``UsageError``; flag errors too).

A launcher reads::

    FLAGS = cli.flag_values()
    _CONFIG = cli.define_config(FLAGS, 'crate_mae_mnist')
    _WORKDIR = flags.DEFINE_string('workdir', None, '...', flag_values=FLAGS)

    def main(argv):  # argv: the positional arguments left after the flags
        ...

    if __name__ == '__main__':
        cli.main(main, FLAGS)
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGISTRY = os.path.join(REPO, 'experiments', 'registry.py')
EXIT_USAGE = 2
ARGV = []  # the command line last parsed, normalised
# Per FlagValues, the command line its --config flag reads its --config.KEY overrides from: empty until that
# FlagValues parses one, so a launcher builds its default config at import without them (a bad override is then a
# usage error, not a traceback).
_CONFIG_ARGV = {}


class UsageError(Exception):
    """Bad command-line input: ``run`` prints it and returns status 2."""


def flag_values():
    """A fresh FlagValues with ``--help``."""
    fv = flags.FlagValues()
    flags.DEFINE_bool('help', False, 'Show this help and exit.', flag_values=fv, short_name='h')
    return fv


def define_config(fv, default=None, help_text='FILE:NAME or a registry NAME, then --config.KEY=VALUE overrides.'):
    """The ``--config`` flag (locked ConfigDict); ``default`` is a registry name or None."""
    return config_flags.DEFINE_config_file(
        'config',
        f'{REGISTRY}:{default}' if default else None,
        help_text,
        flag_values=fv,
        lock_config=True,
        sys_argv=_CONFIG_ARGV.setdefault(id(fv), []),
    )


def config_spec(value):
    """``NAME`` -> ``<repo>/experiments/registry.py:NAME``; a relative FILE missing here is taken from the repo."""
    path, colon, name = value.partition(':')
    if not colon and not path.endswith('.py'):
        return f'{REGISTRY}:{value}'
    if not os.path.isabs(path) and not os.path.exists(path) and os.path.exists(os.path.join(REPO, path)):
        path = os.path.join(REPO, path)
    return f'{path}{colon}{name}'


def normalize(args):
    """Dashes to underscores in flag names (not in ``--config.KEY`` paths or values); ``--config`` specs resolved."""
    out, rest = [], list(args)
    while rest:
        arg = rest.pop(0)
        if arg == '--':
            out += [arg] + rest
            break
        if arg.startswith('-') and not arg.startswith('--config.') and arg not in ('-', '--'):
            dashes = 2 if arg.startswith('--') else 1
            name, eq, value = arg[dashes:].partition('=')
            name = name.replace('-', '_')
            if name == 'config':
                if not eq and rest:
                    value, eq = rest.pop(0), '='
                value = config_spec(value) if eq else value
            arg = '-' * dashes + name + eq + value
        out.append(arg)
    return out


def parse(fv, argv):
    """Parses ``argv`` (program name first) into ``fv``; returns the positional arguments (program name first)."""
    argv = [argv[0]] + normalize(argv[1:])
    if 'config' in fv and fv['config'].default is not None and not any(a.startswith('--config=') for a in argv):
        # Named explicitly, the default config is parsed with the overrides (so a misspelt key names the closest).
        argv.insert(1, f'--config={fv["config"].default_as_str.strip(chr(39))}')
    fv.unparse_flags()
    for name in [n for n in fv if n.startswith('config.')]:  # config_flags defines one per override, at each parse
        delattr(fv, name)
    try:
        ARGV[:] = argv
        if id(fv) in _CONFIG_ARGV:
            _CONFIG_ARGV[id(fv)][:] = argv
        return fv(argv)
    except flags.Error as e:
        lines = str(e).strip().splitlines()  # config_flags quotes the config file's traceback: keep its last line
        raise UsageError(lines[0] + (f' {lines[-1]}' if 'Traceback' in str(e) else '')) from None
    except (KeyError, AttributeError) as e:  # config_flags: an override of a key the config does not have
        while isinstance(e, BaseException) and e.args:  # AttributeError(KeyError(message))
            e = e.args[0]
        text = str(e).replace('\n', ' ')
        raise UsageError(f'a --config.KEY override names no key of the config: {text}') from None


def run(main, fv, argv=None):
    """Parses ``argv`` (the arguments after the program name; sys.argv[1:] when None) and calls
    ``main(positional)``; returns its exit status, or 2 after printing a usage error."""
    module = sys.modules[main.__module__]
    spec = getattr(module, '__spec__', None)
    prog = f'python -m {spec.name}' if spec else os.path.basename(sys.argv[0])
    argv = [prog] + list(sys.argv[1:] if argv is None else argv)
    try:
        positional = parse(fv, argv)
        if fv['help'].value:
            print(f'{module.__doc__ or ""}\nflags:\n{fv.get_help()}')
            return 0
        return main(positional) or 0
    except UsageError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return EXIT_USAGE


def main(function, fv):
    """``if __name__ == '__main__': cli.main(main, FLAGS)``: runs and exits with the status."""
    sys.exit(run(function, fv))


def override_args(fv):
    """The ``--config.KEY=VALUE`` arguments that reproduce the parsed overrides (for a command run elsewhere)."""
    args = []
    for key, value in config_flags.get_override_values(fv['config']).items():
        text = (
            repr(value)
            if isinstance(value, (tuple, list))
            else str(value).lower()
            if isinstance(value, bool)
            else str(value)
        )
        args.append(f'--config.{key}={text}')
    return args


def no_positional(argv):
    """Raises UsageError when anything but flags was given."""
    if len(argv) > 1:
        raise UsageError(f'unexpected arguments {argv[1:]} (every option is a --flag).')


def check_registered_run(config, num_devices: int = 1, process_count: int = 1):
    """``registry.check_remote_run`` (the experiment launch.train will run elsewhere), as a usage error."""
    if config is None:
        raise UsageError('--config=NAME is required (a registered experiment, e.g. crate_mae_base).')
    from experiments import registry  # pylint: disable=import-outside-toplevel  (imports jax: only where needed)

    try:
        registry.check_remote_run(config, num_devices, process_count)
    except ValueError as e:
        raise UsageError(str(e)) from None
