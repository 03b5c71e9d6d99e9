"""Does data.jpeg_draft change how CIFAR's 32 px JPEGs decode? Decodes the first N images of the
zip at full size and with the reduced decode at the sweep preset's square (32 px); prints how
many are identical array for array.

    python benchmarks/results/session9-checks/jpeg_draft_cifar.py ZIP [N]
"""
import sys
import zipfile

import numpy as np

from glsd.data.image_file import decode_image

zip_path, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 200
with zipfile.ZipFile(zip_path) as z:
    names = [m for m in z.namelist() if m.endswith(".jpg")][:n]
    same = sum(np.array_equal(np.asarray(decode_image(z.open(m))), np.asarray(decode_image(z.open(m), 32)))
               for m in names)
print(f"{same} of {len(names)} identical")
