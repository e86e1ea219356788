"""Running a sparse model on sparse kernels where they are faster.

CPU (``execute_sparse``): every decoder linear layer is timed at its real shape and a given token
batch as dense ``F.linear``, as CSR (int32 indices, ``W_csr @ x.T``, float32) and, where both sides
divide by 32, as 32 x 32 BSR; the fastest is kept. A layer that switches is replaced by a
``SparseLinear`` holding the sparse tensor. torch's CPU sparse matmul is float32 only, and
``F.linear(x, W_csr)`` is several times slower than ``W_csr @ x.T``, hence this form. On this kind
of machine CSR wins only from about 85-90% sparsity, BSR from about 70% block sparsity, so a 50%
model keeps every layer dense (and the report says so).

NVIDIA GPUs (``execute_semi_structured``): the float16/bfloat16 linear layers of a 2:4 model become
semi-structured sparse tensors (``torch.sparse.to_sparse_semi_structured``, or torchao's
``sparsify_(model, SemiSparseWeightConfig())``, imported only on that path), after checking the GPU,
the dtype, the 2:4 pattern and the shapes the kernels accept.
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import UsageError

BSR_BLOCK = 32
MARGIN = 1.1  # a sparse kernel must be this many times faster than dense to replace it


class SparseLinear(nn.Module):
    """y = x Wᵀ + b with W a float32 torch sparse tensor (CSR or BSR) [out, in], computed as
    (W @ xᵀ)ᵀ on [tokens, in] float32 inputs; the output has the input's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, in_features: int, out_features: int,
                 kind: str):
        super().__init__()
        self.weight_sparse, self.kind = weight, kind
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()  # [tokens, in]
        y = (self.weight_sparse @ flat.T).T  # [tokens, out]
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, kind={self.kind}"


def sparse_weight(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """A dense [out, in] weight as float32 CSR with int32 indices, or 32 x 32 BSR."""
    dense = weight.detach().float()
    with warnings.catch_warnings():  # "sparse CSR tensor support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        if kind == "csr":
            csr = dense.to_sparse_csr()
            return torch.sparse_csr_tensor(csr.crow_indices().int(), csr.col_indices().int(), csr.values(),
                                           csr.shape)
        return dense.to_sparse_bsr((BSR_BLOCK, BSR_BLOCK))


@dataclass
class KernelChoice:
    """One layer's timings (least milliseconds per call over the rounds, at ``tokens`` tokens) and the kernel kept."""

    name: str
    shape: list
    sparsity: float
    dense_ms: float
    csr_ms: float
    bsr_ms: float | None
    chosen: str


def _median_times(calls: dict, repeats: int, best: bool = False) -> dict:
    """Median (or with ``best`` the least) seconds of each zero-argument call, timed interleaved (one
    of each per round), so that the load of a shared machine falls on all of them alike. Each is run
    enough times per round to take about 2 ms."""
    for call in calls.values():  # warm-up
        call()
    started = time.perf_counter()
    next(iter(calls.values()))()
    inner = max(1, int(0.002 / max(time.perf_counter() - started, 1e-7)))
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            for _ in range(inner):
                call()
            times[name].append((time.perf_counter() - started) / inner)
    pick = min if best else statistics.median
    return {name: pick(values) for name, values in times.items()}


def choose_kernel(name: str, linear: nn.Linear, tokens: int, repeats: int = 5,
                  margin: float = MARGIN) -> tuple[KernelChoice, nn.Module]:
    """Time dense, CSR and BSR for one linear layer on ``tokens`` random float32 inputs; return the
    choice and the module to use (``linear`` itself unless a sparse kernel is ``margin`` times
    faster than dense). Each is timed by its least time over ``repeats`` interleaved rounds: other
    processes on the machine only ever add time."""
    weight = linear.weight.detach()
    x = torch.randn(tokens, linear.in_features, generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    candidates = {"dense": (lambda: linear(x))}
    modules = {"csr": SparseLinear(sparse_weight(weight, "csr"), linear.bias, linear.in_features,
                                   linear.out_features, "csr")}
    if linear.in_features % BSR_BLOCK == 0 and linear.out_features % BSR_BLOCK == 0:
        modules["bsr"] = SparseLinear(sparse_weight(weight, "bsr"), linear.bias, linear.in_features,
                                      linear.out_features, "bsr")
    for kind, module in modules.items():
        candidates[kind] = (lambda m=module: m(x))
    with torch.no_grad():
        median = _median_times(candidates, repeats, best=True)
    chosen = min(median, key=median.get)
    if median[chosen] * margin > median["dense"]:
        chosen = "dense"
    choice = KernelChoice(name, list(weight.shape), float((weight == 0).float().mean()), median["dense"] * 1e3,
                          median["csr"] * 1e3, median["bsr"] * 1e3 if "bsr" in median else None, chosen)
    return choice, linear if chosen == "dense" else modules[chosen]


class SparseExecution:
    """The decoder linear layers of a model with their chosen kernels; ``enable()`` puts the
    switched ones in the model, ``disable()`` the dense originals back (for interleaved timing)."""

    def __init__(self, model: nn.Module, choices: list[KernelChoice], replacements: dict, originals: dict,
                 tokens: int):
        self.model, self.choices, self.tokens = model, choices, tokens
        self.replacements, self.originals = replacements, originals

    def _put(self, modules: dict) -> None:
        for name, module in modules.items():
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent), child, module)

    def enable(self) -> None:
        self._put(self.replacements)

    def disable(self) -> None:
        self._put(self.originals)

    @property
    def switched(self) -> list[KernelChoice]:
        return [c for c in self.choices if c.chosen != "dense"]

    def summary(self) -> str:
        if not self.switched:
            return (f"no layer switched: dense was fastest for all {len(self.choices)} decoder linear layers at "
                    f"{self.tokens} tokens; the model runs dense")
        kinds = {k: sum(c.chosen == k for c in self.switched) for k in ("csr", "bsr")}
        return (f"{len(self.switched)} of {len(self.choices)} decoder linear layers switched at {self.tokens} tokens "
                f"(CSR {kinds['csr']}, BSR {kinds['bsr']}); their time {self.linear_speedup():.2f}x faster than dense")

    def linear_speedup(self) -> float:
        """Dense time / chosen time, summed over the decoder linear layers (the chooser's medians)."""
        dense = sum(c.dense_ms for c in self.choices)
        chosen = sum(getattr(c, f"{c.chosen}_ms") for c in self.choices)
        return dense / max(chosen, 1e-12)

    def report(self) -> dict:
        return {"tokens": self.tokens, "threads": torch.get_num_threads(), "summary": self.summary(),
                "switched": [c.name for c in self.switched],
                "decoder_linear_speedup": self.linear_speedup(), "layers": [asdict(c) for c in self.choices]}


def execute_sparse(model: nn.Module, tokens: int = 64, repeats: int = 5, enable: bool = True) -> SparseExecution:
    """Choose dense, CSR or BSR for every decoder linear layer of ``model`` (on the CPU) at a batch of
    ``tokens`` tokens and, with ``enable``, put the switched layers in place. Returns the choices."""
    from .models.adapters import adapter_for

    device = next(model.parameters()).device
    if device.type != "cpu":
        raise UsageError(f"--execute sparse runs on the CPU (torch's sparse CSR/BSR matmul); the model is on {device}")
    adapter = adapter_for(model)
    prefix = next(name for name, module in model.named_modules() if module is adapter.layers(model))
    choices, replacements, originals = [], {}, {}
    for index, layer in enumerate(adapter.layers(model)):
        for group in adapter.linear_groups(layer):
            for name, linear in group:
                full = f"{prefix}.{index}.{name}"
                choice, module = choose_kernel(full, linear, tokens, repeats)
                choices.append(choice)
                if module is not linear:
                    replacements[full], originals[full] = module, linear
    execution = SparseExecution(model, choices, replacements, originals, tokens)
    if enable:
        execution.enable()
    return execution


@torch.no_grad()
def compare_prefill(execution: SparseExecution, tokens: int | None = None, repeats: int = 7) -> dict:
    """Prefill seconds of one ``tokens``-token prompt, dense against the chosen kernels, with the LM
    head (the whole model) and without it (the decoder only): medians of interleaved rounds."""
    model = execution.model
    tokens = tokens or execution.tokens
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    decoder = model.get_decoder()
    calls = {}
    for state in ("dense", "sparse"):
        switch = execution.disable if state == "dense" else execution.enable

        def whole(switch=switch):
            switch()
            model(input_ids=ids, use_cache=False)

        def body(switch=switch):
            switch()
            decoder(input_ids=ids, use_cache=False)

        calls[f"{state}_with_head"], calls[f"{state}_without_head"] = whole, body
    median = _median_times(calls, repeats)
    execution.enable()
    return {"tokens": tokens, **{f"{k}_s": v for k, v in median.items()},
            "speedup_with_head": median["dense_with_head"] / median["sparse_with_head"],
            "speedup_without_head": median["dense_without_head"] / median["sparse_without_head"]}


SEMI_STRUCTURED_BACKENDS = ("torch", "torchao")


def check_semi_structured(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The decoder linear layers of a model that 2:4 kernels can run, or one UsageError saying why
    not: no CUDA GPU of compute capability 8.0 or newer, a dtype other than float16/bfloat16, a
    weight that is not 2:4 along its input dimension, or a shape the kernel does not accept."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    from .methods.masks import NMPattern, check_nm
    from .models.adapters import adapter_for

    device = next(model.parameters()).device
    if device.type != "cuda":
        raise UsageError(f"--execute 2:4 needs the model on an NVIDIA GPU (semi-structured sparse kernels are CUDA "
                         f"only); it is on {device}")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise UsageError(f"--execute 2:4 needs a GPU of compute capability 8.0 or newer (sparse tensor cores); "
                         f"this one is {major}.{minor}")
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.float16, torch.bfloat16):
        raise UsageError(f"--execute 2:4 needs float16 or bfloat16 weights (--dtype), got {str(dtype)[6:]}")
    cusparselt = torch.backends.cusparselt.is_available()
    if not cusparselt and major != 8:
        raise UsageError(f"--execute 2:4: this torch has no cuSPARSELt and its CUTLASS kernels run on compute "
                         f"capability 8.x only; this GPU is {major}.{minor}")
    kind = SparseSemiStructuredTensorCUSPARSELT if cusparselt else SparseSemiStructuredTensorCUTLASS
    limits = kind._DTYPE_SHAPE_CONSTRAINTS[dtype]
    adapter = adapter_for(model)
    layers = []
    for index, layer in enumerate(adapter.layers(model)):
        for group in adapter.linear_groups(layer):
            for name, linear in group:
                full = f"model.layers.{index}.{name}"
                rows, cols = linear.weight.shape
                if rows % limits.sparse_min_rows or cols % limits.sparse_min_cols:
                    raise UsageError(f"--execute 2:4: {full} is {rows} x {cols}; the kernel needs multiples of "
                                     f"{limits.sparse_min_rows} x {limits.sparse_min_cols}")
                if not check_nm(linear.weight == 0, NMPattern(2, 4)):
                    raise UsageError(f"--execute 2:4: {full} is not 2:4 sparse (prune with --pattern 2:4)")
                layers.append((full, linear))
    return layers


def execute_semi_structured(model: nn.Module, backend: str = "torch") -> dict:
    """Turn the decoder linear layers of a 2:4 model on an NVIDIA GPU into semi-structured sparse
    tensors, in place, after check_semi_structured. backend: "torch" (``to_sparse_semi_structured``)
    or "torchao" (``sparsify_(model, SemiSparseWeightConfig())``, imported here only)."""
    if backend not in SEMI_STRUCTURED_BACKENDS:
        raise UsageError(f"2:4 backend must be one of {', '.join(SEMI_STRUCTURED_BACKENDS)}, got {backend!r}")
    layers = check_semi_structured(model)
    names = {id(linear) for _, linear in layers}
    if backend == "torchao":
        try:
            from torchao.sparsity import SemiSparseWeightConfig, sparsify_
        except ImportError:
            raise UsageError("the torchao 2:4 backend needs torchao (pip install torchao==0.18.0)") from None
        sparsify_(model, SemiSparseWeightConfig(), filter_fn=lambda module, fqn: id(module) in names)
    else:
        from torch.sparse import to_sparse_semi_structured

        for _, linear in layers:
            linear.weight = nn.Parameter(to_sparse_semi_structured(linear.weight.detach()), requires_grad=False)
    return {"backend": backend, "layers": len(layers), "cusparselt": torch.backends.cusparselt.is_available(),
            "summary": f"{len(layers)} decoder linear layers run as 2:4 semi-structured sparse ({backend})"}
