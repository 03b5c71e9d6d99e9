import importlib.util, torch
spec = importlib.util.spec_from_file_location("llc", "benchmarks/local_loss_cost.py"); llc = importlib.util.module_from_spec(spec); spec.loader.exec_module(llc)
data = llc.inputs("cifar10-lowdata-cpu", False)
fn = llc.DINOLocalLoss(data["k"])
for _ in range(3): llc.call(fn, data)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(10): llc.call(fn, data)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22))
