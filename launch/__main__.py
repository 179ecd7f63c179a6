"""python -m launch: the commands, one line each (the first line of each module's docstring)."""

import ast
import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    print('cratemae commands (python -m launch.NAME --help for the flags):')
    for file in sorted(os.listdir(_HERE)):
        if file.endswith('.py') and file not in ('__init__.py', '__main__.py', 'cli.py'):
            with open(os.path.join(_HERE, file)) as f:
                doc = ast.get_docstring(ast.parse(f.read())) or ''
            print(f'  {file[:-3]:<14} {doc.splitlines()[0] if doc else ""}')


if __name__ == '__main__':
    main()
