"""One-process smoke test of the nvshmem4py backend (bootstrap over a 1-rank gloo group,
symmetric allocation, peer pointer table, free, finalize).  Real multi-PE use needs >= 2 GPUs."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.getcwd())
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29533")
os.environ.setdefault("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", "lo")
torch.cuda.set_device(0)
dist.init_process_group("gloo", rank=0, world_size=1)
from tdcompile.kernels.symm import _NvshmemBackend  # noqa: E402

be = _NvshmemBackend(dist.group.WORLD, 0, 1)
a = be.alloc(1 << 20)
print("nvshmem alloc ok:", a.local.shape, a.local.device, "ptrs", a.ptrs.tolist(), "local", a.local.data_ptr())
assert a.ptrs.tolist()[0] == a.local.data_ptr()
a.local.fill_(7)
torch.cuda.synchronize()
assert int(a.local.sum()) == 7 * (1 << 20)
be.free(a)
_NvshmemBackend._finalize()
print("NVSHMEM_SMOKE_OK")
