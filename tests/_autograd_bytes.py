"""What a forward keeps for backward, measured: the bytes of the tensors autograd saves."""
import torch


def saved_bytes(module, x):
    """Bytes saved for backward by one forward, deduplicated by storage, beyond x and the parameters."""
    storages = {}

    def pack(t):
        st_ = t.untyped_storage()
        storages[st_.data_ptr()] = st_.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    known = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in module.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in known), y
