"""JSON lines to ``$OUT`` as each check ends, every line carrying what makes it comparable: device, versions, date
and the command; and the log that keeps each subprocess's command and output tail."""

import datetime
import json
import os
import shlex
import subprocess
import sys
import time


class Recorder:
    """Appends one JSON line per check to <out>/device_run.jsonl (flushed at once, so a timeout loses nothing done)
    and each subprocess's command and output to <out>/device_run.log. ``common`` (device kind, versions) is set by
    the environment stage and goes into every later line."""

    def __init__(self, out: str, budget_s: float, rehearse: bool, argv: list[str]):
        os.makedirs(out, exist_ok=True)
        self.out, self.budget_s, self.rehearse = out, budget_s, rehearse
        self.jsonl = os.path.join(out, 'device_run.jsonl')
        self.log = os.path.join(out, 'device_run.log')
        self.command = ' '.join(shlex.quote(a) for a in ['python', *argv])
        self.common: dict = {}
        self.start = time.monotonic()

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def write(self, stage: str, check: str, **fields) -> dict:
        record = {
            'stage': stage,
            'check': check,
            **fields,
            **self.common,
            'rehearse': self.rehearse,
            'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'elapsed_s': round(time.monotonic() - self.start, 1),
            'command': self.command,
        }
        with open(self.jsonl, 'a') as f:
            f.write(json.dumps(record, sort_keys=True, default=str) + '\n')
        status = 'ok' if record.get('ok') else ('SKIPPED' if record.get('skipped') else 'FAILED')
        shown = {k: v for k, v in fields.items() if k in ('images_per_s', 'tolerance', 'error', 'skipped', 'summary')}
        print(f'[{record["elapsed_s"]:6.1f} s] {stage}/{check}: {status} {json.dumps(shown, default=str)[:300]}')
        sys.stdout.flush()
        return record

    def skip(self, stage: str, check: str, reason: str) -> dict:
        return self.write(stage, check, ok=False, skipped=reason)

    def run(self, cmd: list[str], timeout: float, env: dict | None = None, cwd: str | None = None):
        """(returncode or None on timeout, stdout, stderr, wall seconds); the command and output tail go to the log."""
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=max(5.0, timeout), env=env, cwd=cwd, check=False
            )
            code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            code = None
            stdout, stderr = (x.decode() if isinstance(x, bytes) else (x or '') for x in (e.stdout, e.stderr))
            stderr += f'\nTIMEOUT after {timeout:.0f} s'
        wall = time.monotonic() - t0
        with open(self.log, 'a') as f:
            f.write(f'### {" ".join(shlex.quote(c) for c in cmd)}  (exit {code}, {wall:.1f} s)\n')
            f.write(f'{stdout[-3000:]}\n--- stderr ---\n{stderr[-5000:]}\n\n')
        return code, stdout, stderr, wall


def last_json(text: str) -> dict | None:
    """The last line of ``text`` that parses as a JSON object (the subprocesses' result line)."""
    for line in reversed(text.splitlines()):
        if line.startswith('{'):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None
