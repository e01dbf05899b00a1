import sys, torch, time
from mamba_lm.mamba import mamba_config
from mamba_lm.models import build_model
from mamba_lm.trainer import param_groups
torch.set_num_threads(1); torch.manual_seed(0)
wd, clip = float(sys.argv[1]), float(sys.argv[2])
V=16; m=build_model("mamba", mamba_config("tiny", vocab_size=V+2))
opt=torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in param_groups(m, wd)], lr=3e-3, betas=(0.9,0.95))
for step in range(301):
    a=torch.randint(0,V,(64,8)); x=torch.cat([a, torch.full((64,1),V), a],1)
    logits=m(x[:,:-1])[..., :V+2]
    la=torch.nn.functional.cross_entropy(logits.reshape(-1,V+2), x[:,1:].reshape(-1), reduction='none').view(64,-1)
    opt.zero_grad(); la.mean().backward()
    gn=torch.nn.utils.clip_grad_norm_(m.parameters(), clip if clip>0 else float('inf')); opt.step()
    if step%60==0: print(f"wd={wd} clip={clip} step {step} copy loss {la[:,9:].mean().item():.3f} grad_norm {gn:.2f}", flush=True)
