"""Let megatron.core 0.6.0 run unmodified on a CPU-only torch, in the harness worker processes only.

Megatron's code allocates with `device='cuda'` / `torch.cuda.current_device()`, moves with `.cuda()`,
checks `tensor.type() == 'torch.cuda.FloatTensor'`, synchronises the device after p2p, counts MoE
tokens with `torch.histc` on integer tensors (a CUDA-only kernel), and keeps its model-parallel RNG
streams with torch.cuda's generator. `install()` maps all of that onto the CPU:
device arguments naming CUDA become 'cpu', `.cuda()` is the identity, `.type()` reports the CUDA
type name of a CPU tensor, synchronize is a no-op, integer histc counts through float (exact for
the small integers it counts), and the RNG tracker forks the CPU generator —
on CPU the default generator is the one dropout draws from, exactly as the CUDA generator is on a GPU.
Megatron's own files stay untouched.
"""

import contextlib
import functools

import torch

_FACTORIES = ("tensor", "empty", "zeros", "ones", "full", "arange", "rand", "randn", "randint")


def _cpu_device(device):
    if isinstance(device, int):
        return "cpu"
    if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
        return "cpu"
    return device


def _with_cpu_device(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return factory(*args, **kwargs)
    return wrapper


def _cuda_type_name(original_type):
    @functools.wraps(original_type)
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is not None:
            return original_type(self, dtype, non_blocking, **kwargs)
        name = original_type(self)
        return "torch.cuda." + name[len("torch."):] if name.startswith("torch.") and ".cuda." not in name else name
    return type_


def _histc_for_integers(histc):
    @functools.wraps(histc)
    def wrapper(input, *args, **kwargs):
        if input.is_floating_point():
            return histc(input, *args, **kwargs)
        return histc(input.double(), *args, **kwargs).to(input.dtype)
    return wrapper


def install_device_shims() -> None:
    for name in _FACTORIES:
        setattr(torch, name, _with_cpu_device(getattr(torch, name)))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.type = _cuda_type_name(torch.Tensor.type)
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.histc = _histc_for_integers(torch.histc)


def install_cpu_rng_tracker() -> None:
    """Replace Megatron's CUDA RNG tracker by one that keeps CPU generator states (same API)."""
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception('seed {} already exists'.format(seed))
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception('rng state {} already exists'.format(name))
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception('rng state {} is not added'.format(name))
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()


def install() -> None:
    install_device_shims()
    install_cpu_rng_tracker()
