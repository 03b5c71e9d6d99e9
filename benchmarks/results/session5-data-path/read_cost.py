import sys, time, zipfile, io
from PIL import Image
from glsd.data import image_file as imf
zf = zipfile.ZipFile(sys.argv[1])
names = [n for n in zf.namelist() if n.endswith('.jpg')][:2000]
blobs = [zf.read(n) for n in names]
def raw(b):
    with Image.open(io.BytesIO(b)) as img:
        img.load(); return img.convert('RGB') if img.mode != 'RGB' else img
def new(b):
    with imf.read_deadline(60):
        return imf.decode_image(io.BytesIO(b))
def new_nodeadline(b):
    return imf.decode_image(io.BytesIO(b))
def deadline_only(b):
    with imf.read_deadline(60):
        pass
def zipopen_raw(n):
    with zf.open(n) as f, Image.open(f) as img:
        img.load(); return img
fns = {'raw': (raw, blobs), 'new': (new, blobs), 'new_nodeadline': (new_nodeadline, blobs), 'deadline_only': (deadline_only, blobs), 'zip+raw': (zipopen_raw, names)}
res = {k: [] for k in fns}
for rep in range(5):
    for k, (f, xs) in fns.items():
        t = time.perf_counter()
        for x in xs: f(x)
        res[k].append((time.perf_counter() - t) / len(xs) * 1e6)
for k, v in res.items(): print(f'{k:16s} us/image median {sorted(v)[2]:.1f}  all {[round(x,1) for x in v]}')
