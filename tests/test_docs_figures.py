"""Every figure with a unit in README.md (minutes, images/s, test counts) appears on a docs/ page that says how it was
measured: a page naming a command, a machine and a date. Approximations ("about 14 minutes") restate a measured
figure and are not checked."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]

_FIGURES = (
    (re.compile(r'(\d+(?:\.\d+)?)\s*min(?:utes?)?(?:\s+(\d+)\s*s\b)?'), 'min'),
    (re.compile(r'(\d[\d,]*(?:\.\d+)?)\s*(?:images|img)/s'), 'images/s'),
    (re.compile(r'(\d[\d,]*)\s+(passed|skipped|tests\b)'), None),
)
_APPROXIMATE = re.compile(r'(?:about|around|roughly|~|≈|under|over|up to)\s*\**$', re.IGNORECASE)
_DATE = re.compile(r'\b20\d\d-\d\d-\d\d\b')
_COMMAND = re.compile(r'python -m |\.ci/run|pytest')
_MACHINE = re.compile(r'EPYC|Xeon|vCPU|H100|H200|TPU v\d|lscpu|Core\(TM\)')


def figures(text):
    """{(unit, value[, seconds])} of the exact figures in ``text`` (approximations left out)."""
    out = set()
    for pattern, unit in _FIGURES:
        for m in pattern.finditer(text):
            if _APPROXIMATE.search(text[max(0, m.start() - 12) : m.start()]):
                continue
            value = float(m.group(1).replace(',', ''))
            if unit == 'min':
                out.add(('min', value, int(m.group(2) or 0)))
            elif unit == 'images/s':
                out.add(('images/s', value))
            else:
                out.add((m.group(2).strip(), value))
    return out


def documented_figures(pages):
    """The figures of the pages that name a command, a machine and a date."""
    out = set()
    for text in pages:
        if _DATE.search(text) and _COMMAND.search(text) and _MACHINE.search(text):
            out |= figures(text)
    return out


def missing(readme, pages):
    return sorted(figures(readme) - documented_figures(pages))


def test_every_readme_figure_is_documented_with_its_command_machine_and_date():
    pages = [p.read_text() for p in sorted((REPO / 'docs').glob('*.md'))]
    absent = missing((REPO / 'README.md').read_text(), pages)
    assert not absent, f'figures in README.md that no docs/ page with a command, machine and date states: {absent}'


def test_the_check_fails_on_an_undocumented_figure():
    page = 'On 2026-11-30, `python -m launch.train` on a 2-vCPU AMD EPYC VM took 9 min 1 s (396 images/s).'
    assert missing('It took 9 min 1 s at 396 images/s, about 10 minutes.', [page]) == []
    assert missing('It took 11 min 4 s.', [page]) == [('min', 11.0, 4)]
    assert missing('497 passed in 13 min 32 s', [page]) == [('min', 13.0, 32), ('passed', 497.0)]
    undated = page.replace('2026-11-30', 'yesterday')
    assert missing('It took 9 min 1 s.', [undated]) == [('min', 9.0, 1)]
