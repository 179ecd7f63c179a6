"""The reference PyTorch CRATE-MAE's train step, timed: eager with bf16 autocast, then under torch.compile.

  python -m tools.device_checks.reference_torch --reference_dir .reference/CRATE [--model base] [--batch 256]
      [--image_size 224] [--steps 10] [--warmup 3] [--modes eager,compile] [--tiny]    prints one JSON line per mode

The model is the reference's own ``model/crate_ae/crate_ae.py`` (``mae_crate_<model>``) from a checkout of
Ma-Lab-Berkeley/CRATE that the caller supplies (never part of this repository); the step is forward at mask ratio
0.75, backward and the recipe's AdamW (lr 1.5e-4 x batch / 256, betas (0.9, 0.95), wd 0.05), as in
tools/compare_reference_cpu.py. ``--tiny`` builds its MaskedAutoencoderViT at width 32, one layer, 32 px (the
rehearsal on a CPU). Each record: images/s (median step), first-step time (for torch.compile: compiling), peak
memory (torch.cuda.max_memory_allocated on a GPU, else null)."""

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time


def build(reference_dir, model, tiny):
    if importlib.util.find_spec('torchvision') is None:  # timm imports names from it; CRATE-MAE uses none of them
        from tools import compare_reference_cpu

        compare_reference_cpu._install_torchvision_placeholder()  # pylint: disable=protected-access
    sys.path.insert(0, reference_dir)
    from model.crate_ae import crate_ae  # the reference's own code, from the caller's checkout

    if tiny:
        return crate_ae.MaskedAutoencoderViT(
            crate_ae.CRATEEncoderBlock,
            crate_ae.CRATEDecoderBlock,
            img_size=32,
            patch_size=16,
            embed_dim=32,
            depth=1,
            num_heads=2,
            decoder_embed_dim=32,
            decoder_depth=1,
            decoder_num_heads=2,
        )
    return getattr(crate_ae, f'mae_crate_{model}')()


def time_mode(torch, net, mode, batch, image_size, steps, warmup, device, backend):
    net = net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1.5e-4 * batch / 256, betas=(0.9, 0.95), weight_decay=0.05)
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    forward = torch.compile(net, backend=backend) if mode == 'compile' else net

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _, _ = forward(images, mask_ratio=0.75)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize()

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loss = step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() if device.type == 'cuda' else None
    return {
        'images_per_s': batch / median,
        'ms_per_step': {'median': 1e3 * median, 'min': 1e3 * min(times), 'max': 1e3 * max(times)},
        'first_step_s': first,
        'peak_memory_gib': None if peak is None else peak / 2**30,
        'loss': float(loss.detach()),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--reference_dir', required=True)
    p.add_argument('--model', default='base', choices=['tiny', 'small', 'base', 'large'])
    p.add_argument('--batch', type=int, default=256)
    p.add_argument('--image_size', type=int, default=224)
    p.add_argument('--steps', type=int, default=10)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--modes', default='eager,compile')
    p.add_argument('--tiny', action='store_true')
    p.add_argument(
        '--compile_backend',
        default='inductor',
        help="torch.compile's backend; the CPU rehearsal uses aot_eager (dynamo and autograd tracing of the "
        "reference without inductor's minute of C++ compiling)",
    )
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.join(args.reference_dir, 'model', 'crate_ae')):
        raise SystemExit(
            f'--reference_dir {args.reference_dir!r} has no model/crate_ae: export a checkout of '
            'Ma-Lab-Berkeley/CRATE there (tools/device_wheels.sh does).'
        )
    import torch

    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    failures = 0
    for mode in args.modes.split(','):
        torch.manual_seed(0)
        record = {
            'model': 'tiny (32 px, width 32, 1 layer)' if args.tiny else f'mae_crate_{args.model} (reference)',
            'mode': f'{mode} + bf16 autocast',
            'compile_backend': args.compile_backend if mode == 'compile' else None,
            'batch': args.batch,
            'image_size': 32 if args.tiny else args.image_size,
            'torch': torch.__version__,
            'device': torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu',
        }
        try:
            net = build(args.reference_dir, args.model, args.tiny)
            record.update(
                time_mode(
                    torch,
                    net,
                    mode,
                    args.batch,
                    record['image_size'],
                    args.steps,
                    args.warmup,
                    device,
                    args.compile_backend,
                )
            )
        except Exception as e:  # noqa: BLE001 - a mode that cannot run (no compiler, OOM) is a result; go on
            failures += 1
            record['error'] = f'{type(e).__name__}: {e}'[:1500]
        print(json.dumps(record), flush=True)
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
