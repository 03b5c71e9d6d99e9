import torch, time
torch.manual_seed(0)
x = torch.randn(2,64,64,256).bfloat16()
c = torch.randn(1,256)
t = 0.1
one = x.new_full((1,), 1/t, dtype=torch.float32)
def bench(f, n=30):
    f(); ts=[]
    for _ in range(n):
        a=time.perf_counter(); f(); ts.append(time.perf_counter()-a)
    ts.sort(); return ts[len(ts)//2]*1e3
cases = {
 "copy+div_": lambda: x.to(torch.float32, copy=True).div_(t),
 "mul fp32 1elem": lambda: torch.mul(x, one),
 "float()*s": lambda: x.float().mul_(1/t),
 "copy+sub_+div_": lambda: x.to(torch.float32, copy=True).sub_(c).div_(t),
 "add(shift, x, alpha)": lambda: torch.add(c*(-1/t), x, alpha=1/t),
 "float().sub_().div_()": lambda: x.float().sub_(c).div_(t),
 "sum float copy": lambda: x.float().sum(0),
 "sum dtype": lambda: x.flatten(0,-2).sum(0, dtype=torch.float32),
 "sum float copy flat": lambda: x.flatten(0,-2).float().sum(0),
}
g = torch.randn(2,64,64,256); tg = torch.rand(2,64,64,256)
s = torch.tensor(2.0)
cases.update({
 "addcmul out bf16": lambda: torch.addcmul(g, tg, -s, out=torch.empty_like(g, dtype=torch.bfloat16)),
 "sub_ then to bf16": lambda: g.clone().sub_(tg).mul_(s).to(torch.bfloat16),
 "sub then to": lambda: torch.sub(g, tg).to(torch.bfloat16),
 "to bf16": lambda: g.to(torch.bfloat16),
 "exp": lambda: g.exp(),
})
for k, f in cases.items():
    print(f"{k:28s} {bench(f):7.2f} ms")
