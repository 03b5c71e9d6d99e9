# Old code (commit 8d31b7c): decode-only (device) and batched-views (cpu_batched) loaders, in process.
import time
from glsd.config import load_config
from glsd.data.loader import select_images
from glsd.data.gpu_augment import build_device_loader, build_batched_cpu_loader
import sys
cfg = load_config('cpu-default', [f'data.root={sys.argv[1]}', 'data.source=zip', 'data.num_workers=0',
                                  'data.augment_on=device', 'data.num_images=2048'])
_, subset = select_images(cfg, None)
for name, build in (('device', build_device_loader), ('cpu_batched', build_batched_cpu_loader)):
    loader, sampler, _ = build(cfg, subset, 0, 1, False)
    it = iter(loader); next(it)
    t = time.perf_counter()
    for _ in range(30): next(it)
    print('OLD', name, 'loader images/s (in process, 30 batches of 64)', round(1920 / (time.perf_counter() - t)))
