# New code: the same two loaders (augment_on=device: decode + parameter draw; cpu: views made), in process.
import sys, time
from glsd.config import load_config
from glsd.data.loader import build_loader, select_images
for aug in ('device', 'cpu'):
    cfg = load_config('cpu-default', [f'data.root={sys.argv[1]}', 'data.source=zip', 'data.num_workers=0',
                                      f'data.augment_on={aug}', 'data.num_images=2048'])
    _, subset = select_images(cfg, None)
    loader, sampler = build_loader(cfg, subset, 0, 1, False)
    it = iter(loader); next(it)
    t = time.perf_counter()
    for _ in range(30): next(it)
    print('NEW', aug, 'loader images/s (in process, 30 batches of 64)', round(1920 / (time.perf_counter() - t)))
