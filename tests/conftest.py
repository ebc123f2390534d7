import os

# Tests never use NVLink multicast either, and run with gloo on CPU.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

# In-process tests invoke the app without main(): register the research commands as the entry point would.
import overlap_bench.research.commands  # noqa: E402,F401
