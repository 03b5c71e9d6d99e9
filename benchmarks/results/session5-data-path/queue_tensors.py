import time, torch, torch.multiprocessing as mp
def worker(q, n, kind, done):
    for _ in range(n):
        if kind == 'many': obj = [torch.rand(6, 64, 4) for _ in range(9)] + [torch.rand(6,64,5), torch.zeros(64, dtype=torch.long), torch.zeros(64, dtype=torch.long), torch.zeros(64,3,32,32, dtype=torch.uint8)]
        else: obj = [torch.rand(6, 64, 18), torch.rand(6,64,5), torch.zeros(64, dtype=torch.long), torch.zeros(64, dtype=torch.long), torch.zeros(64,3,32,32, dtype=torch.uint8)]
        q.put(obj)
    done.wait()
if __name__ == '__main__':
    for kind in ['many', 'packed', 'many', 'packed']:
        q = mp.Queue(); n = 200; done = mp.Event()
        p = mp.Process(target=worker, args=(q, n, kind, done)); p.start()
        q.get(); t = time.perf_counter()
        for _ in range(n - 1): q.get()
        dt = time.perf_counter() - t; done.set(); p.join()
        print(kind, 'ms per batch', round(dt / (n - 1) * 1e3, 3))
