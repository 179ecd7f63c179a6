"""The per-device memory table of docs/scale_out.md: every (model, slice, FSDP, remat) cell, compiled ahead of time.

  python -m tools.aot_table --rows=docs/aot_table.jsonl \
      [--models=crate_mae_tiny,crate_mae_small,crate_mae_base,crate_mae_large,mae_vit_base,fair_mae_base] \
      [--slices=v5e-256,v4-32,v5p-128] [--remat=none,full] [--global_batch=4096] [--budget_s=3600]

Each cell is `cratemae.aot.compile_report` (the code path of `launch.aot_compile`) on the registry's config with
`train.global_batch` set, `train.eval_batch` set to the device count (the registry's 64 does not split over 256
devices) and FSDP as docs/scale_out.md sets it. Cells already in --rows are skipped, so an interrupted or
budget-limited run continues where it stopped; at the end (or with --render_only) the Markdown table of every row
in the file is printed. Needs libtpu (pip install -e '.[tpu]'), not a TPU.
"""

import dataclasses
import json
import os
import re
import sys
import time

from absl import app
from absl import flags

_ROWS = flags.DEFINE_string('rows', 'docs/aot_table.jsonl', 'JSON-lines file of measured cells (appended to).')
_MODELS = flags.DEFINE_list(
    'models',
    ['crate_mae_tiny', 'crate_mae_small', 'crate_mae_base', 'crate_mae_large', 'mae_vit_base', 'fair_mae_base'],
    'Registry entries.',
)
_SLICES = flags.DEFINE_list('slices', ['v5e-256', 'v4-32', 'v5p-128'], 'TPU slices (aot_compile --topology names).')
_REMAT = flags.DEFINE_list('remat', ['none'], "model.remat values; 'full' only where 'none' was refused.")
_GLOBAL_BATCH = flags.DEFINE_integer('global_batch', 4096, 'Global batch of every cell.')
_BUDGET_S = flags.DEFINE_float('budget_s', 3600.0, 'Start no new compile after this many seconds.')
_RENDER_ONLY = flags.DEFINE_bool('render_only', False, 'Print the table of --rows and compile nothing.')

GIB = 2**30


def cell_key(row) -> tuple:
    return row['model'], row['slice'], row['fsdp'], row.get('remat', 'none')


def read_rows(path) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def fits(row) -> bool:
    """The criterion of ``aot.compile_report``: compiled, and XLA's peak within HBM (recomputed for older rows)."""
    return not row['error'] and row['peak'] <= row['hbm']


def wanted_cells(models, slices, remats, done_rows) -> list[tuple]:
    """Cells in table order; a remat other than 'none' only where the same cell without remat was refused."""
    done = {cell_key(r): r for r in done_rows}
    cells = []
    for model in models:
        for tpu_slice in slices:
            for fsdp in (False, True):
                for remat in remats:
                    if remat != 'none':
                        plain = done.get((model, tpu_slice, fsdp, 'none'))
                        if plain is None or fits(plain):
                            continue
                    if (model, tpu_slice, fsdp, remat) not in done:
                        cells.append((model, tpu_slice, fsdp, remat))
    return cells


def refusal_summary(error: str) -> str:
    """'temporaries 52.74G > 30.75G' from the compiler's RESOURCE_EXHAUSTED line (the line itself otherwise)."""
    match = re.search(r'temporaries \(([\d.]+G)\) exceeds available HBM \(([\d.]+G)\)', error)
    return f'temporaries {match[1]} > {match[2]}' if match else error


def render_table(rows, params_by_model) -> str:
    """Markdown table, one line per row, sorted by model, slice, remat and FSDP."""
    model_order = {m: i for i, m in enumerate(params_by_model)}
    rows = sorted(
        rows, key=lambda r: (model_order.get(r['model'], 99), r['slice'], r.get('remat', 'none') != 'none', r['fsdp'])
    )
    lines = [
        '| model | params | slice | FSDP | images/device | XLA peak | upper bound | fits | compile s |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        name = f"`{r['model']}`" + (f" + `remat={r['remat']}`" if r.get('remat', 'none') != 'none' else '')
        devices = 1
        for size in r['mesh'].values():
            devices *= size
        if r['error']:
            peak, bound, verdict = f'refused: {refusal_summary(r["error"])}', '—', 'no'
        else:
            peak, bound = f"{r['peak'] / GIB:.2f}", f"{r['total'] / GIB:.2f}"
            verdict = 'no' if not fits(r) else ('yes (tight)' if r['total'] > r['hbm'] else 'yes')
        lines.append(
            f"| {name} | {params_by_model.get(r['model'], 0) / 1e6:.1f}M | {r['slice']} | "
            f"{'on' if r['fsdp'] else 'off'} | {r['global_batch'] // devices} | {peak} | {bound} | {verdict} | "
            f"{r['lower_s'] + r['compile_s']:.0f} |"
        )
    return '\n'.join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    import experiments  # pylint: disable=import-outside-toplevel  (after flag parsing: imports jax)
    from cratemae import aot  # pylint: disable=import-outside-toplevel
    from cratemae import models  # pylint: disable=import-outside-toplevel

    params_by_model = {m: models.count_params(experiments.get_config(m).model) for m in _MODELS.value}
    rows = read_rows(_ROWS.value)
    if not _RENDER_ONLY.value:
        start = time.time()
        devices = {}
        os.makedirs(os.path.dirname(os.path.abspath(_ROWS.value)), exist_ok=True)
        # Recomputed after every cell: a refused cell decides whether its remat variant is wanted.
        while cells := wanted_cells(_MODELS.value, _SLICES.value, _REMAT.value, rows):
            if time.time() - start > _BUDGET_S.value:
                print(f'Budget of {_BUDGET_S.value:.0f} s spent; rerun the same command to continue.', flush=True)
                break
            model, slice_name, fsdp, remat = cells[0]
            tpu_slice = aot.resolve_slice(slice_name)
            if slice_name not in devices:
                devices[slice_name] = aot.topology_devices(tpu_slice)
            config = experiments.get_config(model).copy_and_resolve_references()
            config.train.global_batch = _GLOBAL_BATCH.value
            if fsdp:  # what --config.sharding_rules="(('.*', 'fsdp_largest'),)" --config.mesh.data=1 fsdp=-1 sets
                config.sharding_rules = (('.*', 'fsdp_largest'),)
                config.mesh.update(data=1, fsdp=-1, model=1)
            config.train.eval_batch = tpu_slice.devices
            config.model.remat = remat
            report = aot.compile_report(config, tpu_slice, devices[slice_name])
            measured = {k: v for k, v in dataclasses.asdict(report).items() if k != 'slice'}
            row = dict(
                model=model,
                slice=slice_name,
                fsdp=fsdp,
                remat=remat,
                hbm=tpu_slice.hbm_bytes,
                total=report.total,
                date=time.strftime('%Y-%m-%d'),
                **measured,
            )
            with open(_ROWS.value, 'a') as f:
                f.write(json.dumps(row) + '\n')
            rows.append(row)
            print(aot.format_report(report, f"{model}{' (FSDP)' if fsdp else ''} remat={remat}"), flush=True)
        missing = wanted_cells(_MODELS.value, _SLICES.value, _REMAT.value, rows)
        if missing:
            print(f'{len(missing)} cells still to compile, e.g. {missing[0]}.', flush=True)
    print(render_table(rows, params_by_model))
    return 0


if __name__ == '__main__':
    app.run(lambda argv: sys.exit(main(argv)))
