"""The planner's damage probe: how far a changed model's outputs move from the
uncompressed model's on the calibration images.

A probe changes one layer (its kernel recomposed at a rank) or one group of
filters (zeroed in place, ``zero_channels``), so everything the network
computes before that layer is what the reference computed.  The model is traced
once (``torch.fx``); at every *cut point* — a node that every path from the
input to the output passes through, such as a residual block's output — the
reference activations of each calibration batch are cached (within a memory
budget), and a probe runs the network only from the last cut point before the
first layer it changed.  The results are those of a whole forward: the same
operations on the same values.

A probe's change can also be given as a value (``Change``: layers used in
place of others, outputs changed after a layer) that the traced model runs
without being modified; ``Probe.damages`` then measures many changes side by
side on threads (``probe_workers``).  On 2 CPU cores that planned ResNet-20 and
ResNet-56 1.07–1.08× faster than one probe at a time on both cores
(``benchmarks/planner_speed.py --workers``): small convolutions there already
use two threads well.
"""
from __future__ import annotations

import contextlib
import copy
import operator
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as torch_module
from torchvision.ops import FrozenBatchNorm2d

from norton.core import ChannelPadShortcut, CPDBlock, TuckerBlock, batch_statistics, batchnorms, replace_module
from norton.core.surgery import flatten_tensors

CACHE_FALLBACK_BYTES = 2 << 30  # activations cached where the free memory cannot be read (``cache_budget``)
WORKER_BYTES = 4 << 30  # activations the probes running side by side may hold together (about 4 of the largest each)
THREAD_HEAP_BYTES = 64 << 20  # the largest block glibc's malloc serves a thread other than the main one from its heap


@dataclass
class Change:
    """One probe's change to the traced reference model, made without modifying
    it (so that probes can run side by side): ``swaps`` — traced layer name →
    the module used in its place (without BatchNorms of its own); ``after`` —
    traced layer name → a callable with a forward hook's signature ``(module,
    inputs, output) -> output`` applied to that layer's output."""

    swaps: dict[str, nn.Module] = field(default_factory=dict)
    after: dict[str, Callable] = field(default_factory=dict)

    @property
    def changed(self) -> list[str]:
        return [*self.swaps, *self.after]


# the traced forward writes outputs over activations no longer needed (``TracedForward._execute``); False: a new
# buffer for every output, as the model's own forward (``benchmarks/planner_speed.py --overwrite`` times both)
OVERWRITE = True
ADDITIONS = (operator.add, torch.add)  # what a traced addition calls
NORMS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}  # the input dimensions each takes


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _hooked(module: nn.Module) -> bool:
    """Whether a forward hook sees ``module``'s inputs or outputs (it may keep them)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks)


OPAQUE = (CPDBlock, TuckerBlock, ChannelPadShortcut, FrozenBatchNorm2d)  # modules of the traced graph, not traced into


class _Tracer(fx.Tracer):
    """Layers a probe may hook or swap stay modules of the traced graph (``opaque``)."""

    def __init__(self, opaque: tuple[type, ...] = OPAQUE):
        super().__init__()
        self.opaque = opaque

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.opaque) or super().is_leaf_module(m, qualname)


class TracedForward:
    """``model`` traced by torch.fx (its layers shared, not copied), run from any
    cut point — a node after which no value computed before it is needed — with
    values freed as soon as no later node reads them.  ``opaque``: the module types
    that stay calls of the graph (probes swap them whole; other modules' layers
    are called one by one)."""

    def __init__(self, model: nn.Module, opaque: tuple[type, ...] = OPAQUE):
        self.module = fx.GraphModule(model, _Tracer(opaque).trace(model))
        self.nodes = list(self.module.graph.nodes)
        self.position = {node: i for i, node in enumerate(self.nodes)}
        self.first_call = {}  # module name -> position of its first call
        for i, node in enumerate(self.nodes):
            if node.op == "call_module":
                self.first_call.setdefault(node.target, i)
        self.layers = {name: self.module.get_submodule(name) for name in self.first_call}  # what each call runs
        self.freed: list[list[fx.Node]] = [[] for _ in self.nodes]  # per position: the values last used there
        last_use = {}
        for i, node in enumerate(self.nodes):
            for arg in node.all_input_nodes:
                last_use[arg] = i
        for node, i in last_use.items():
            self.freed[i].append(node)
        # per position: which arguments of a node that may write its output over an input (``_overwrite``: a
        # BatchNorm, a ReLU, an addition) are read there for the last time
        self.dying: dict[int, tuple[int, ...]] = {}
        for i, node in enumerate(self.nodes):
            if node.kwargs or not (node.op == "call_module" and len(node.args) == 1
                                   or node.op == "call_function" and node.target in ADDITIONS and len(node.args) == 2):
                continue
            last = tuple(k for k, arg in enumerate(node.args) if isinstance(arg, fx.Node) and arg.op != "get_attr"
                         and last_use.get(arg) == i and sum(a is arg for a in node.args) == 1)
            if last:
                self.dying[i] = last

    def cut_points(self) -> list[fx.Node]:
        """Nodes after which no other value computed earlier is still needed."""
        last_use = {}
        for i, node in enumerate(self.nodes):
            for arg in node.all_input_nodes:
                if arg.op != "get_attr":
                    last_use[arg] = i
        cuts, live = [], set()
        for i, node in enumerate(self.nodes[:-1]):
            if node.op != "get_attr":
                live.add(node)
            live = {n for n in live if last_use.get(n, -1) > i}
            if live == {node} and node.op != "placeholder":
                cuts.append(node)
        return cuts

    def _fetch(self, target: str):
        value = self.module
        for part in target.split("."):
            value = getattr(value, part)
        return value

    def _execute(self, begin: int, env: dict, keep: set | None = None, change: Change | None = None,
                 stop: int | None = None):
        """Run the nodes from position ``begin`` on, given ``env`` (the values they need from before it),
        with ``change`` made; the output, or with ``keep`` the values of those nodes (with ``stop``: up to
        the node at that position, not run, whose first input is kept as "input").

        Without gradients, a BatchNorm with batch statistics, a ReLU and an addition write their output
        over an input read there for the last time, where that input is memory this forward allocated and
        nothing else holds (``_overwrite``): the same values, without a new buffer for each.  What holds a
        tensor is seen through the values of this forward, forward hooks and ``change.after``; a layer that
        keeps a reference to its own output by other means would see it written over."""
        kept: dict = {}
        swaps, after = (change.swaps, change.after) if change is not None else ({}, {})
        overwrite = OVERWRITE and not torch.is_grad_enabled()
        # memory that is not this forward's own: the values given, those kept, those a hook or ``after`` saw
        foreign = {_storage(v) for v in env.values() if isinstance(v, Tensor)} if overwrite else set()

        def load(node: fx.Node):
            if node not in env and node.op == "get_attr":
                env[node] = self._fetch(node.target)
            return env[node]

        for position, node in enumerate(self.nodes[begin:], begin):
            if node in env:  # the input, given
                continue
            args = fx.node.map_arg(node.args, load)
            kwargs = fx.node.map_arg(node.kwargs, load)
            if position == stop:
                kept["input"] = args[0]
                return kept
            if node.op == "output":
                return args[0] if keep is None else kept
            if node.op == "get_attr":
                env[node] = self._fetch(node.target)
            elif node.op == "call_module":
                module = swaps[node.target] if node.target in swaps else self.layers[node.target]
                # something else sees its input and output (asked only where anything is written over)
                seen = overwrite and (node.target in after or _hooked(module))
                out = None
                if overwrite and not seen and position in self.dying:
                    out = self._overwrite(module, args, self.dying[position], env, foreign)
                if out is None:
                    out = module(*args, **kwargs)
                env[node] = after[node.target](module, args, out) if node.target in after else out
                if seen:
                    foreign.update(_storage(v) for v in (*args, out, env[node]) if isinstance(v, Tensor))
            elif node.op == "call_function":
                out = None
                if overwrite and position in self.dying:
                    out = self._overwrite(node.target, args, self.dying[position], env, foreign)
                env[node] = node.target(*args, **kwargs) if out is None else out
            else:  # call_method
                env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            if keep is not None and node in keep:
                kept[node] = env[node]
                if overwrite and isinstance(env[node], Tensor):
                    foreign.add(_storage(env[node]))
            for used in self.freed[position]:  # freed as soon as no later node needs it: the memory is reused
                env.pop(used, None)
        raise RuntimeError("the traced graph has no output")

    @staticmethod
    def _free(args: tuple, indices: tuple[int, ...], env: dict, foreign: set[int]) -> list[int]:
        """Of the arguments at ``indices`` (each read for the last time), those whose memory this forward
        allocated and no other value it holds shares."""
        free = []
        for k in indices:
            t = args[k]
            if not isinstance(t, Tensor) or t.numel() == 0:
                continue
            ptr = _storage(t)
            if ptr not in foreign and sum(isinstance(v, Tensor) and _storage(v) == ptr for v in env.values()) == 1:
                free.append(k)
        return free

    @classmethod
    def _overwrite(cls, op, args: tuple, dying: tuple[int, ...], env: dict, foreign: set[int]) -> Tensor | None:
        """``op(*args)`` written over one of the arguments at ``dying`` (read there for the last time) that
        is free to overwrite (``_free``); None: not an operation done so here, or no argument free.  Each
        gives the same values as ``op`` itself: BatchNorm's own kernel with its output on its input (CPU,
        batch statistics: the statistics are taken before anything is written), ``relu_``, ``add_``.  What it
        saves is a new buffer per output: a ResNet-50 forward of 128 images at 224×224 ran 1.07× faster
        (``benchmarks/planner_speed.py --overwrite``, the planner guide)."""
        if type(op) in NORMS:
            x = args[0]
            if (not op.training or op.track_running_stats or not isinstance(x, Tensor) or x.device.type != "cpu"
                    or x.dtype not in (torch.float32, torch.float64) or x.dim() not in NORMS[type(op)]
                    or not (x.is_contiguous() or x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
                    or not cls._free(args, dying, env, foreign)):
                return None
            torch.ops.aten.native_batch_norm.out(x, op.weight, op.bias, None, None, True, 0.0, op.eps, out=x,
                                                 save_mean=x.new_empty(0), save_invstd=x.new_empty(0))
            return x
        if type(op) is nn.ReLU and not op.inplace:
            return torch.relu_(args[0]) if cls._free(args, dying, env, foreign) else None
        if op in ADDITIONS:
            a, b = args
            if not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype
                    and a.device == b.device and a.stride() == b.stride()):
                return None
            free = cls._free(args, dying, env, foreign)
            if not free:
                return None
            return a.add_(b) if free[0] == 0 else b.add_(a)  # IEEE addition commutes: the same values as a + b
        return None

    def input_of(self, position: int, begin: int, value: Tensor, keep: int | None = None
                 ) -> tuple[Tensor, Tensor | None]:
        """The first input of the node at ``position``, running from the cut point at ``begin`` (its
        ``value``; 0, the placeholder: the model's input), and the value of the cut point ``keep`` on the way
        (before ``position``; None: none kept)."""
        kept = self._execute(begin, {self.nodes[begin]: value}, keep={self.nodes[keep]} if keep is not None else set(),
                             stop=position)
        return kept["input"], kept.get(self.nodes[keep]) if keep is not None else None


class CachedForward(TracedForward):
    """``model`` traced, with the activations of the calibration batches at its
    cut points cached; ``run(i, changed)`` computes batch i's outputs starting
    from the last cached cut point before the first of the ``changed`` layers.
    Swap layers with ``swapped`` (on the traced module); forward hooks on the
    layers (shared with ``model``) act as they would on ``model``."""

    def __init__(self, model: nn.Module, batches: list[Tensor], budget: int | None = None):
        super().__init__(model)
        self.batches = batches
        candidates = self._useful(self.cut_points())
        if budget is None:
            budget = cache_budget(batches[0].device)
        with torch.no_grad(), batch_statistics(self.module):
            first = self._execute(0, {self.nodes[0]: batches[0]}, keep=set(candidates))
            # what each cut point holds for every batch, from the first (batches are about the same size):
            # the cut points are chosen before the other batches run, so only what is kept is ever held
            images = sum(x.shape[0] for x in batches)
            size = {n: first[n].numel() * first[n].element_size() for n in candidates}
            # the largest activation of one batch (at a cut point), what a probe running beside others holds
            self.activation_bytes = max(size.values(), default=0)
            chosen, used = set(), 0
            for node in reversed(candidates):  # from the output back: those save the most
                held = size[node] * images // batches[0].shape[0]
                if used + held <= budget:
                    chosen.add(node)
                    used += held
            self.cache: list[dict[fx.Node, Tensor]] = [{n: v for n, v in first.items() if n in chosen}]
            del first
            for x in batches[1:]:
                self.cache.append(self._execute(0, {self.nodes[0]: x}, keep=chosen))
        self.cached_bytes = used
        self.cuts = sorted(self.position[n] for n in chosen)

    def _useful(self, cuts: list[fx.Node]) -> list[fx.Node]:
        """The cut points a probe can start from: each the last before some layer's first call (of two
        cut points with no layer first called between them — an addition and the activation after it — the
        earlier would never be used, and would take the memory of one that is)."""
        starts = {self.first_call[name] for name in self.first_call}
        positions = [self.position[c] for c in cuts] + [len(self.nodes)]
        return [c for c, here, following in zip(cuts, positions, positions[1:])
                if any(here < p <= following for p in starts)]

    def start_for(self, changed: Iterable[str]) -> int | None:
        """The position of the last cached cut point before every changed layer (None: run it all)."""
        first = min((self.first_call.get(name, 0) for name in changed), default=0)
        before = [c for c in self.cuts if c < first]
        return before[-1] if before else None

    def run(self, index: int, changed: Iterable[str], change: Change | None = None):
        """Batch ``index``'s outputs, with ``change`` made (its layers count as ``changed``)."""
        changed = [*changed, *(change.changed if change is not None else [])]
        start = self.start_for(changed)
        if start is None:
            return self._execute(0, {self.nodes[0]: self.batches[index]}, change=change)
        node = self.nodes[start]
        return self._execute(start + 1, {node: self.cache[index][node]}, change=change)

    @contextlib.contextmanager
    def swapped(self, name: str, new: nn.Module) -> Iterator[None]:
        """The traced module with ``new`` in place of its layer ``name``, put back after."""
        old = self.module.get_submodule(name)
        replace_module(self.module, name, new)
        self.layers[name] = new
        try:
            yield
        finally:
            replace_module(self.module, name, old)
            self.layers[name] = old


class Probe:
    """Damage of a changed model: divergence of its outputs from the reference
    model's on the calibration batches, every BatchNorm normalising with the
    batch's own statistics (BN re-estimation and evaluation in one pass; the
    reference is computed the same way, so an unchanged model has damage 0).
    With ``cached`` (a ``CachedForward`` of the reference model), ``damage(None,
    changed)`` measures the traced model from the first changed layer on."""

    def __init__(self, model: nn.Module, batches: list[Tensor], cached: CachedForward | None = None):
        self.batches, self.cached = batches, cached
        self.reference = [self._outputs(model, x) for x in batches]

    @staticmethod
    @torch.no_grad()
    def _outputs(model: nn.Module, x: Tensor) -> list[Tensor]:
        with batch_statistics(model):
            return _float64(model(x))

    @torch.no_grad()
    def damage(self, model: nn.Module | None, changed: Iterable[str] = (), batches: Sequence[int] | None = None
               ) -> float:
        """The mean divergence over the calibration batches (over those numbered in ``batches``, if given)."""
        total = 0.0
        changed = list(changed)
        indices = range(len(self.batches)) if batches is None else batches
        with batch_statistics(self.cached.module if model is None else model):
            for i in indices:
                out = self.cached.run(i, changed) if model is None else model(self.batches[i])
                total += divergence(_float64(out), self.reference[i])
        return total / len(indices)

    def damages(self, changes: Iterable[Change | Callable[[], float]], batches: Sequence[int] | None = None,
                workers: int = 1) -> Iterator[float]:
        """The damage of each of ``changes`` (made to the cached traced model), in order, measured by
        ``workers`` threads side by side (each with its share of torch's threads).  A callable in
        ``changes`` is a measurement that needs the model to itself: it runs alone, after those before it,
        and its result is yielded in its place.  ``changes`` is read as the measurements go, so the next
        change can be built while the others run."""
        indices = range(len(self.batches)) if batches is None else batches
        before = torch.get_num_threads()
        inner = max(1, before // workers)
        pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(inner,)) if workers > 1 else None
        modes = contextlib.ExitStack()  # batch statistics, while changes are measured
        active = False
        pending: deque = deque()
        try:
            for change in changes:
                if not isinstance(change, Change):  # alone, after the measurements in flight, in the model's modes
                    while pending:
                        yield pending.popleft().result()
                    modes.close()
                    active = False
                    yield change()
                    continue
                if not active:
                    modes.enter_context(batch_statistics(self.cached.module))
                    if pool is not None:  # the next changes are built here while the workers run: on their share
                        torch.set_num_threads(inner)
                        modes.callback(torch.set_num_threads, before)
                    active = True
                if pool is None:
                    yield self._changed_damage(change, indices)
                    continue
                pending.append(pool.submit(self._changed_damage, change, indices))
                while len(pending) > 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for job in pending:
                job.cancel()
            if pool is not None:
                pool.shutdown(wait=True)
                torch.set_num_threads(before)
            modes.close()

    @torch.no_grad()
    def _changed_damage(self, change: Change, indices: Sequence[int]) -> float:
        if any(batchnorms(m) for m in change.swaps.values()):  # its modes would be set while others run
            raise ValueError("a probe's swapped-in layer holds BatchNorms; measure it with damage(model)")
        total = 0.0
        for i in indices:
            total += divergence(_float64(self.cached.run(i, (), change)), self.reference[i])
        return total / len(indices)


def cache_budget(device: torch.device) -> int:
    """The memory the probes' activation cache may take on ``device``: half of
    what is free there now (on a CPU, Linux's MemAvailable), or
    ``CACHE_FALLBACK_BYTES`` where that cannot be read.  With a fixed 2 GiB,
    ResNet-50 at 224×224 on 256 calibration images left the probes of its first
    two stages running from the input."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024 // 2
        except OSError:
            pass
    return CACHE_FALLBACK_BYTES


def probe_workers(device: torch.device | None, activation_bytes: int) -> int:
    """How many probes run side by side: on a CPU, one per torch thread (each
    probe on one thread: small convolutions parallelise poorly over threads)
    while their activations — about four of the largest, ``activation_bytes``,
    each — fit ``WORKER_BYTES`` and each fits a thread's heap
    (``THREAD_HEAP_BYTES``); on an accelerator one (its kernels fill it).

    glibc's malloc serves a thread other than the main one from heaps of at
    most 64 MiB; a larger buffer is a fresh ``mmap`` every time, its pages
    faulted in on first touch.  ResNet-50's activations at 224×224 are 205 MB
    a batch of 64: two forwards of it side by side on one thread each took
    6.2 s on 2 cores, one after the other on both threads of the main one
    5.0 s, without a page fault (allocator tuned, ``norton.tune_allocator``;
    ``benchmarks/allocator.py --probes``)."""
    if device is not None and device.type != "cpu":
        return 1
    if activation_bytes > THREAD_HEAP_BYTES:
        return 1
    fit = WORKER_BYTES // max(1, 4 * activation_bytes)
    return max(1, min(torch.get_num_threads(), fit))


def _float64(outputs) -> list[Tensor]:
    """A model's outputs as a flat list of float64 tensors, the form divergences are taken in."""
    return [t.detach().to(torch.float64) for t in flatten_tensors(outputs)]


def probe_layout(model: nn.Module, batches: list[Tensor]) -> tuple[nn.Module, list[Tensor]]:
    """``model`` (a copy) and ``batches`` in channels-last memory layout, the
    layout the planner's probes run in whenever the images are 4-D and the
    model has convolutions: a batch-statistics forward of ResNet-20 on 256
    16×16 images took 47.7 ms against 58.7 ms contiguous on 2 CPU cores
    (``benchmarks/planner_speed.py --layout``).  A fixed
    rule, not a timing: the same call gives the same damages to the last
    digit (the values differ from contiguous only by float rounding)."""
    if batches[0].dim() != 4 or not any(p.dim() == 4 for p in model.parameters()):
        return model, batches
    return (copy.deepcopy(model).to(memory_format=torch.channels_last),
            [b.contiguous(memory_format=torch.channels_last) for b in batches])


def divergence(got: list[Tensor], want: list[Tensor]) -> float:
    """KL(reference ‖ changed) of logits (mean over images); relative squared error of other outputs."""
    total = 0.0
    for g, w in zip(got, want):
        if w.dim() == 2:
            total += float(F.kl_div(F.log_softmax(g, 1), F.log_softmax(w, 1), log_target=True, reduction="batchmean"))
        else:
            total += float(((g - w) ** 2).sum() / (w ** 2).sum().clamp_min(1e-30))
    return total
