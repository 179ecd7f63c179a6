"""Print every registered experiment with its parameter count, description and where it is defined.

python -m launch.list [--grep PATTERN]       # PATTERN: a regular expression searched in the names
"""

import re

from absl import flags

import experiments
from cratemae import models
from launch import cli

FLAGS = cli.flag_values()
_GREP = flags.DEFINE_string('grep', None, 'Only the names this regular expression finds.', flag_values=FLAGS)


def main(argv):
    cli.no_positional(argv)
    try:
        pattern = re.compile(_GREP.value or '')
    except re.error as e:
        raise cli.UsageError(f'--grep {_GREP.value!r} is not a regular expression: {e}') from None
    names = [n for n in experiments.names() if pattern.search(n)]
    if not names:
        raise cli.UsageError(f'no registered experiment matches --grep {_GREP.value!r}.')
    rows = [
        (n, f'{models.count_params(experiments.get_config(n).model):,}', experiments.where(n), experiments.describe(n))
        for n in names
    ]
    widths = [max(len(r[i]) for r in rows + [('name', 'params', 'defined in')]) for i in range(3)]
    print(f'{"name":<{widths[0]}}  {"params":>{widths[1]}}  {"defined in":<{widths[2]}}  description')
    for name, params, where, description in rows:
        print(f'{name:<{widths[0]}}  {params:>{widths[1]}}  {where:<{widths[2]}}  {description}')


if __name__ == '__main__':
    cli.main(main, FLAGS)
