import time, sys
import experiments
from cratemae import train
from cratemae.evaluate import checkpoints, features, probe
steps = int(sys.argv[1]); wd = f'/tmp/ev_wd{steps}'
c = experiments.get_config('crate_mae_test')
c.train.update(steps=steps, eval_every=steps, log_every=steps); c.checkpoint.update(every=steps, async_save=False)
c.optim.warmup_steps = 10
t = time.time()
train.train_and_evaluate(c, wd)
print('pretrain', time.time() - t, flush=True)
ck = checkpoints.load(wd)
rnd = checkpoints.random_init(ck.model_config, 0)
cfg = features.probe_data_config(ck)
for feat in ['cls', 'mean']:
    for name, w in [('pre', ck), ('rand', rnd)]:
        t = time.time()
        tr = features.split_features(w, cfg, 'train', feat, use_cache=False)
        te = features.split_features(w, cfg, 'test', feat, use_cache=False)
        t1 = time.time() - t
        r = probe.run_probes(tr, te, ('ridge', 'knn', 'linear'), probe.LinearProbeConfig(base_lr=1.0, epochs=30, warmup_epochs=3))
        print(feat, name, {k: round(v['top1'], 3) for k, v in r.items()}, f'feat {t1:.1f}s total {time.time()-t:.1f}s', flush=True)
