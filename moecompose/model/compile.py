import torch
def compile_model(model, **kw):
    return torch.compile(model, fullgraph=True, **kw)
