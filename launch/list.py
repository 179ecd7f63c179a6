"""Print every registered experiment with its description and parameter count.

python -m launch.list
"""

import experiments
from cratemae import models


def main():
    rows = []
    for name in experiments.names():
        config = experiments.get_config(name)
        rows.append((name, f'{models.count_params(config.model):,}', experiments.describe(name)))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    print(f'{"name":<{widths[0]}}  {"params":>{widths[1]}}  description')
    for name, params, description in rows:
        print(f'{name:<{widths[0]}}  {params:>{widths[1]}}  {description}')


if __name__ == '__main__':
    main()
