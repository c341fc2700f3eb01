"""Lean decoding: one token per row through a decode step with static shapes, compiled (AOTInductor on CPU).

The eager decode step (``generate.decode_step``) is general: any rows, any cache length, masks only when
needed. Each of those decisions is a little Python and a host sync per token, and every tensor operation
is its own dispatch: for SmolLM2 (30 layers) about a thousand small operations per token, which costs as
much as the matrix products themselves on a CPU. The compiled step removes both:

- static shapes: it always attends over the whole preallocated cache (``max_len`` keys, the ones past each
  row's position masked out), so one compiled graph serves every step; the cache length is rounded up to
  a power of two so that a new prompt length rarely means a new graph;
- no host syncs: positions stay a tensor (each row's cache length); the only value that leaves the graph
  is the logits, from which the caller samples;
- fusion: inductor (the C++ backend on CPU) fuses norms, RoPE, residual adds and SiLU into a few loops
  per layer, and calls the matrix kernels (dense, or int8/int4 from ``scratchlm.quant``) as they are.

It reuses the model's own modules (norms, projections, MLPs, RoPE tables) and writes out only the attention
of one query against the cache; floating-point sums may associate differently from the eager path, so
``tests/test_compiled.py`` checks that greedy outputs stay identical.

    decoder = compile_decoding(llm.model)   # later generate/chat/stream calls use it
    llm.model.decoder = None                # back to eager

On the CPU each shape is compiled ahead of time into an AOTInductor package (``scratchlm.aot``) kept under
``$SCRATCHLM_HOME/compile/<key>`` (``scratchlm.compile_cache``): only the first process on a machine pays the
compile; later ones load the package in milliseconds, without importing dynamo or inductor, and run it on the
model's own weights. Elsewhere ``torch.compile`` compiles it in every process. The first call of each shape is
checked against the same step run eagerly on a copy of the cache: a compile that fails or a package that gives
other logits is thrown away and rebuilt once, then the decoder falls back to eager decoding with a one-line
notice: never a crash, never different output. ``LLM.load`` attaches it by default to int4 models
(``use_compiled_by_default``) with background builds (``scratchlm.aot_background``): the first run decodes eagerly
while a worker builds the package; ``--compile`` builds it in the foreground, ``--no-compile`` stays eager.
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch
from torch import nn

from scratchlm.errors import ContextLengthError
from scratchlm.model import KVCache, Transformer, apply_rope

MIN_CACHE = 256
POLL_SECONDS = 1.0  # how often a decoder looks for a package being built in the background
MAX_REQUESTS = 2  # times a decoder asks a background worker for one package before it stays eager
# The compiled step's logits against the eager static step's on the first call of a shape: sums associate
# differently (and bfloat16 kernels round differently), a broken graph differs by orders of magnitude more.
CHECK_RTOL = 2e-2
_compiled_for: int | None = None  # the CompiledDecoder whose graphs dynamo holds (see __call__)


def static_step(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, k: list[torch.Tensor],
                v: list[torch.Tensor], rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One token per row through ``model`` over the whole preallocated cache: logits [B, V] in float32.

    ``positions`` [B]: each row's cache length (where its new key/value goes); ``k``/``v``: one [B, Hkv,
    max_len, D] tensor per layer, written in place. ``rope``: the (cos, signed sin) tables (default the
    model's own; ``scratchlm.aot`` passes its buffers so that export names them)."""
    cfg = model.config
    max_len = k[0].shape[2]
    pos = positions[:, None]  # (B, 1): each row's new token goes at its current length
    x = model.tok_embeddings(tokens)  # (B, 1, C)
    tables = None
    if cfg.positions == "learned":
        x = x + model.pos_embeddings(pos)
    else:
        cos, sin = rope if rope is not None else model.rope(tokens.device)
        tables = (cos[pos][:, None].to(x.dtype), sin[pos][:, None].to(x.dtype))  # (B, 1, 1, D)
    visible = torch.arange(max_len, device=tokens.device)[None, None, None, :] <= pos[:, None, :, None]
    for i, block in enumerate(model.blocks):
        x = x + _attention(block.attn, block.attn_norm(x), tables, k[i], v[i], pos, visible)
        x = x + block.mlp(block.mlp_norm(x))
    return model.logits(model.final_norm(x)[:, -1]).float()


def _attention(attn: nn.Module, h: torch.Tensor, rope, k_cache: torch.Tensor, v_cache: torch.Tensor,
               pos: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """``model.Attention.forward`` for one new token per row, written out over the whole cache.

    SDPA with an explicit mask over the whole cache took 34 us per layer here against 27 us for these two
    products and a fused masked softmax (float32 cache of 256 positions, measured in the compiled step).
    """
    cfg = attn.config
    B, H, Hkv, D = h.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q, k, v = attn.project_qkv(h)
    q = q.reshape(B, 1, H, D).transpose(1, 2)  # (B, H, 1, D)
    k = k.reshape(B, 1, Hkv, D).transpose(1, 2)  # (B, Hkv, 1, D)
    v = v.reshape(B, 1, Hkv, D).transpose(1, 2)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    # Row b's new key goes to position pos[b]. Written as an index_put_ (not scatter_), inductor updates
    # the cache in place; a scatter_ made it copy the whole cache of every layer at every step.
    rows = torch.arange(B, device=h.device)
    k_cache[rows, :, pos[:, 0]] = k[:, :, 0].to(k_cache.dtype)
    v_cache[rows, :, pos[:, 0]] = v[:, :, 0].to(v_cache.dtype)
    # Grouped-query attention: query heads j*G .. j*G+G-1 share key/value head j (HF's repeat_kv order).
    qg = q.reshape(B, Hkv, H // Hkv, D).to(k_cache.dtype)  # the cache may be float32 (see KVCache)
    scores = (qg @ k_cache.transpose(-1, -2)).float() * D**-0.5  # (B, Hkv, G, max_len); softmax in float32
    scores = scores.masked_fill(~visible, float("-inf"))  # keys beyond each row's position
    y = scores.softmax(dim=-1).to(v_cache.dtype) @ v_cache  # (B, Hkv, G, D)
    return attn.o_proj(y.reshape(B, 1, H * D).to(h.dtype))


class CompiledDecoder:
    """A compiled ``decode_step(tokens [B, 1], cache) -> logits [B, V]`` for one model.

    Specialised on the batch size and the cache length (a power of two, at least ``MIN_CACHE``), compiled on
    first use of each. On the CPU (``backend="aot"``) each shape is an AOTInductor package on disk
    (``scratchlm.aot``): built once per machine (SmolLM2's int4 step: 91 s of CPU on 2 cores), then loaded in
    milliseconds by later processes without importing the compiler. ``backend="dynamo"`` (other devices) uses
    ``torch.compile``, whose graphs inductor caches on disk but which every process re-traces.
    """

    def __init__(self, model: Transformer, compile: bool = True, progress: bool = False, disk_cache: bool = True,
                 backend: str | None = None, recipe: dict | None = None, background: bool = False):
        self.model = model
        # How to load the model again (LLM.load keyword arguments), for a background worker to build packages
        # (scratchlm.aot_background). background=True: a missing package is asked for there and this process
        # decodes eagerly meanwhile; False: the first call of a layout builds it here and waits.
        self.recipe = recipe
        self.background = background and recipe is not None
        self._pending: dict[tuple, float] = {}  # layouts being built in the background -> when to look again
        self._worker = None  # the background worker this process started (polled, so that it is reaped)
        self._asked: dict[tuple, int] = {}  # layout -> how many times a worker was asked for it
        self._specs: dict[tuple, dict] = {}  # layout -> what the worker was asked (aot_background.request)
        self._told: set[str] = set()  # notices printed (each once per process)
        self.compiled = compile
        self.progress = progress  # say so on stderr when a call is about to compile a graph
        self.disk_cache = disk_cache  # compile into $SCRATCHLM_HOME/compile/<key> (scratchlm.compile_cache)
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        self.backend = backend or ("aot" if on_cpu else "dynamo")
        if self.backend not in ("aot", "dynamo"):
            raise ValueError(f"unknown backend {self.backend!r}: choose aot or dynamo")
        self.cache_dir = None
        self._cached = False  # whether that directory already held this model's step when we started
        self._retried = False
        self._steps: dict[tuple, object] = {}  # layout of the cache (see _layout) -> its checked step
        self.built: list[tuple] = []  # layouts this process compiled (the rest were loaded)
        # torch.compile is created at the first call: importing dynamo and inductor costs ~116 MiB of memory,
        # which a process that only loads the model (or prefills) should not pay.
        self.step = None if compile else self._step

    def _make_step(self):
        # Guards re-check every module attribute before each call (3 ms per token for SmolLM2, measured);
        # the decoder belongs to one model whose weights do not change while it decodes, so skip them.
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        return torch.compile(self._step, fullgraph=True, dynamic=False, options=options)

    def _prepare_dir(self) -> None:
        if self.cache_dir is None and (self.disk_cache or self.backend == "aot"):
            from scratchlm.compile_cache import cache_dir, prepare

            self.cache_dir = cache_dir(self.model)
            self._cached = prepare(self.cache_dir, self.model)

    def expected_compile_seconds(self) -> int:
        """A rough CPU time to build one package: SmolLM2's int4 step (30 layers) took 91 s (benchmarks/RESULTS.md)."""
        return max(10, round(90 * self.model.config.n_layers / 30))

    def cache_length(self, needed: int) -> int:
        """The cache length to allocate for ``needed`` tokens: a power of two, within the context window."""
        limit = self.model.config.context_length
        if needed > limit:
            raise ContextLengthError(f"{needed} tokens do not fit in the context window of {limit} tokens")
        size = MIN_CACHE
        while size < needed:
            size *= 2
        return min(size, limit)

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, k: list[torch.Tensor],
              v: list[torch.Tensor]) -> torch.Tensor:
        return static_step(self.model, tokens, positions, k, v)

    @staticmethod
    def _layout(cache: KVCache) -> tuple:
        """What a compiled step is specialised on: the batch size, the cache length and the cache's strides (a
        server's window into a longer cache has the strides of that cache; an AOT package assumes its own)."""
        return (cache.k.shape[1], cache.max_len, *cache.k[0].stride())

    def package_path(self, layout: tuple):
        """Where the AOT package of ``layout`` lives in this model's cache directory. Inductor writes the thread
        count into the generated loops (``#pragma omp parallel num_threads(N)``; none for 1), so it is in the name."""
        return self.cache_dir / ("step-" + "-".join(str(n) for n in layout) + f"-t{torch.get_num_threads()}.pt2")

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed one token per row of ``cache`` (all rows) and return the next logits [B, V] in float32."""
        if int(cache.lengths.max()) >= cache.max_len:  # one sync per step, on a [B] tensor, for a clear error
            raise ContextLengthError(f"the cache of {cache.max_len} tokens is full")
        # One input per layer: written in place through a view of the whole [n_layers, ...] buffer, inductor
        # copies the entire cache at every step (5 ms for 256 positions); per-layer inputs are updated in place.
        if not self.compiled:
            return self._eager(tokens, cache)
        if self.backend == "dynamo":
            global _compiled_for
            if _compiled_for not in (None, id(self)):
                # Module guards are skipped, so dynamo cannot tell two decoders' graphs apart (same code object):
                # one compiled decoder per process at a time; switching to another one recompiles it.
                torch._dynamo.reset()
            _compiled_for = id(self)
        layout = self._layout(cache)
        step = self._steps.get(layout)
        if step is None:
            if layout in self._pending and not self._arrived(layout):
                from scratchlm.generate import decode_step

                return decode_step(self.model, tokens, cache)  # the general eager step until the package is built
            return self._first_call(tokens, cache)
        logits = step(tokens, cache.lengths, list(cache.k.unbind(0)), list(cache.v.unbind(0)))
        cache.lengths += 1
        return logits

    def _eager(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if self.step is self._step:  # compile=False: the static step itself (tests check its logic this way)
            logits = self._step(tokens, cache.lengths, list(cache.k.unbind(0)), list(cache.v.unbind(0)))
            cache.lengths += 1
            return logits
        from scratchlm.generate import decode_step

        return decode_step(self.model, tokens, cache)  # the fallback: the general eager step

    def _get_step(self, layout: tuple, args: tuple):
        """The compiled step for ``layout``: AOT: the package on disk (built first if missing); dynamo: one
        ``torch.compile`` function for all layouts (it compiles the graph at its first call)."""
        self._prepare_dir()
        if self.backend == "dynamo":
            if self.step is None:
                self.step = self._make_step()
            return self.step
        from scratchlm import aot
        from scratchlm.compile_cache import locked

        path = self.package_path(layout)
        if not path.is_file():
            with locked(path):  # another process building it: wait, then load what it built
                if not path.is_file():
                    aot.build_package(self.model, *args, path)
                    self.built.append(layout)
        return aot.load_step(path, self.model)

    def _first_call(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Compile (or load from the disk cache) the step for this layout, and check it against the eager static
        step run on a copy of the cache; on any failure, rebuild the cache once, then decode eagerly."""
        layout = self._layout(cache)
        if self._build_in_background(layout, cache):
            from scratchlm.generate import decode_step

            return decode_step(self.model, tokens, cache)
        k_ref, v_ref = cache.k.clone(), cache.v.clone()
        want = self._step(tokens, cache.lengths, list(k_ref.unbind(0)), list(v_ref.unbind(0)))
        args = (tokens, cache.lengths, list(cache.k.unbind(0)), list(cache.v.unbind(0)))
        try:
            self._prepare_dir()
            ready = self.backend == "aot" and self.package_path(layout).is_file()
            if self.progress and not ready:
                from scratchlm.progress import stage

                what = "loading the compiled decode step" if self._cached and self.backend == "dynamo" \
                    else "compiling the decode step"
                hint = "" if self._cached and self.backend == "dynamo" else \
                    f" (first run on this machine only, about {self.expected_compile_seconds()} s)"
                with stage(f"{what} for batch {layout[0]}, cache {layout[1]}{hint}"):
                    step = self._get_step(layout, args)
                    got = step(*args)
            else:
                step = self._get_step(layout, args)
                got = step(*args)
            error = (got - want).abs().max().item()
            if not error <= CHECK_RTOL * max(1.0, want.abs().max().item()):  # also catches NaN
                raise RuntimeError(f"its logits differ from the eager step's by {error:.3g}")
        except Exception as exc:  # a compiler missing, a broken cache entry, a graph inductor cannot lower...
            cache.k.copy_(k_ref)
            cache.v.copy_(v_ref)
            self._failed(exc)
            got = want
        else:
            self._steps[layout] = step
        cache.lengths += 1
        return got

    # ---- packages built by a background process (scratchlm.aot_background) ---------------------------------
    def prepare_in_background(self, caches: list[KVCache]) -> list[tuple]:
        """Ask a background process for the AOT packages of these caches' layouts, without waiting.

        ``caches``: ``KVCache`` objects (or views, e.g. ``cache.rows(0, 4)`` cut to a length) shaped as the calls
        to come will be: batch rows, cache length and strides make a layout (a server: one per batch-size and
        length bucket). Layouts already attached, on disk or asked for are skipped. Returns the layouts asked
        for. A call on a layout decodes eagerly until its package is on disk, then loads and checks it (the
        decoder looks about once a second; ``ready`` says whether it is there). One worker per model and machine
        builds the requests one after another, niced; it needs the model's ``recipe`` (``LLM.load`` gives it):
        ValueError without one. Does nothing (returns []) for the dynamo backend or a decoder gone eager."""
        if self.backend != "aot" or not self.compiled:
            return []
        if self.recipe is None:
            raise ValueError("background builds need to load the model again: load it with LLM.load (or pass "
                             "compile_decoding(..., recipe=LLM.load keyword arguments))")
        self._prepare_dir()
        asked = []
        for cache in caches:
            layout = self._layout(cache)
            if layout in self._steps or layout in self._pending or self.package_path(layout).is_file():
                continue
            self._request(layout, self._spec(layout, cache))
            asked.append(layout)
        return asked

    def ready(self, cache: KVCache) -> bool:
        """Whether a call on ``cache``'s layout runs (or, at its next call, loads) the compiled step: it is attached
        already, or its package is on disk; False while it is being built, or where compiling failed."""
        layout = self._layout(cache)
        if layout in self._steps:
            return True
        if not self.compiled or self.backend != "aot" or self._pending.get(layout) == math.inf:
            return False
        self._prepare_dir()
        return self.package_path(layout).is_file()

    def _say(self, line: str) -> None:
        if line not in self._told:
            self._told.add(line)
            print(f"scratchlm: {line}", file=sys.stderr)

    def _spec(self, layout: tuple, cache: KVCache) -> dict:
        k = cache.k[0]
        return {"layout": list(layout), "shape": list(k.shape), "stride": list(k.stride()),
                "dtype": str(k.dtype).removeprefix("torch."), "n_layers": cache.k.shape[0],
                "threads": torch.get_num_threads(), "recipe": self.recipe}

    def _request(self, layout: tuple, spec: dict) -> None:
        """Ask a background worker for ``layout``'s package (at most ``MAX_REQUESTS`` times per layout: a worker
        that dies without a word must not be restarted forever) and look for it again in ``POLL_SECONDS``."""
        from scratchlm import aot_background

        path = self.package_path(layout)
        reason = aot_background.failure(path)
        asked = self._asked.get(layout, 0)
        if reason is not None or asked >= MAX_REQUESTS:
            self._pending[layout] = math.inf  # eager for this layout in this process
            self._say(f"the compiled decode step could not be built here ({reason or 'its build stopped'}); decoding "
                      f"eagerly (details: {path.parent / aot_background.LOG}; --no-compile skips the attempt)")
            return
        self._asked[layout] = asked + 1
        self._specs[layout] = spec
        worker = aot_background.request(path, spec)
        if worker is not None:
            self._worker = worker
        self._pending[layout] = time.monotonic() + POLL_SECONDS
        self._say("compiling the decode step for this machine in a background process (once per model shape, "
                  f"about {self.expected_compile_seconds()} s of CPU); decoding eagerly until it is ready, later runs "
                  "load it (--no-compile or SCRATCHLM_COMPILE=0 turns compiling off)")

    def _build_in_background(self, layout: tuple, cache: KVCache) -> bool:
        """Whether this call decodes eagerly because ``layout``'s package is missing: then it is asked for (in the
        background mode) instead of built here."""
        if not (self.background and self.backend == "aot"):
            return False
        try:
            self._prepare_dir()
            if self.package_path(layout).is_file():
                return False
            self._request(layout, self._spec(layout, cache))
        except OSError as exc:  # a read-only home, no room...: eager, one notice
            self._pending[layout] = math.inf
            self._say(f"the compiled decode step cannot be cached here ({exc}); decoding eagerly")
        return True

    def _arrived(self, layout: tuple) -> bool:
        """Whether ``layout``'s package, asked for in the background, is on disk now (looked for at most once per
        ``POLL_SECONDS``; a cheap time check otherwise). A worker gone without building it is asked again."""
        now = time.monotonic()
        if now < self._pending[layout]:
            return False
        self._pending[layout] = now + POLL_SECONDS
        if self._worker is not None and self._worker.poll() is not None:
            self._worker = None  # reaped
        try:
            self._prepare_dir()
            path = self.package_path(layout)
            if path.is_file():
                del self._pending[layout]
                return True
            from scratchlm.aot_background import building

            if not building(self.cache_dir):  # the worker finished or died without it (or the cache was emptied)
                self._request(layout, self._specs[layout])
        except OSError:
            self._pending[layout] = math.inf
        return False

    def _failed(self, exc: Exception) -> None:
        """Throw away this model's compile cache; the next first call rebuilds it once, after that: eager."""
        from scratchlm.compile_cache import discard

        if self.backend == "dynamo":
            torch._dynamo.reset()
            self.step = None
        self._steps.clear()
        if self.cache_dir is not None:
            discard(self.cache_dir)
            self.cache_dir = None
        reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:120]}"
        if self._retried:
            self.compiled = False
            self._pending.clear()
            print(f"scratchlm: the compiled decode step does not work here ({reason}); decoding eagerly "
                  "(--no-compile skips the attempt)", file=sys.stderr)
        else:
            self._retried = True
            print(f"scratchlm: the compiled decode step failed ({reason}); its cache was deleted and will be "
                  "rebuilt", file=sys.stderr)


def compile_decoding(model: nn.Module, compile: bool = True, progress: bool = False,
                     disk_cache: bool = True, backend: str | None = None, recipe: dict | None = None,
                     background: bool = False) -> CompiledDecoder:
    """Attach a compiled decode step to ``model`` (as ``model.decoder``), used by generate/chat/stream and the
    server. Nothing compiles until the first decode step.

    ``progress``: print a line on stderr whenever a call compiles a new graph (tens of seconds).
    ``disk_cache``: keep inductor's output in ``$SCRATCHLM_HOME/compile/<key>`` (else inductor's default; AOT
    packages always go there). ``backend``: "aot" (default on CPU) or "dynamo" (``torch.compile``).
    ``recipe``: the ``LLM.load`` keyword arguments that load this model again (``LLM.load`` passes them), so that
    a background process can build packages (``prepare_in_background``); with ``background=True`` every missing
    package is built that way while the calls decode eagerly (``LLM.load``'s default), else the first call of
    a layout builds its package and waits for it."""
    model.decoder = CompiledDecoder(model, compile, progress, disk_cache, backend, recipe, background)
    return model.decoder


def prepare_in_background(model: nn.Module, caches: list[KVCache]) -> list[tuple]:
    """``model.decoder.prepare_in_background(caches)`` (see there) when ``model`` has a compiled decoder; [] when
    it has none (eager: nothing to prepare)."""
    decoder = getattr(model, "decoder", None)
    return decoder.prepare_in_background(caches) if decoder is not None else []


def ready(model: nn.Module, cache: KVCache) -> bool:
    """``model.decoder.ready(cache)``: whether decoding on ``cache``'s layout runs compiled now (or at its next call);
    False for a model without a compiled decoder."""
    decoder = getattr(model, "decoder", None)
    return decoder is not None and decoder.ready(cache)


def compile_setting() -> bool | None:
    """``$SCRATCHLM_COMPILE`` as a ``--compile``/``--no-compile`` flag: True (1, true, yes, on), False (0, false,
    no, off), None (unset, or anything else: the default, ``use_compiled_by_default``)."""
    setting = os.environ.get("SCRATCHLM_COMPILE", "").strip().lower()
    return True if setting in ("1", "true", "yes", "on") else False if setting in ("0", "false", "no", "off") else None


# Where the compiled step is the default: the models whose decoding it makes faster, measured on SmolLM2 by
# benchmarks/aot_default.py (docs/quantization.md#compiled-decoding has the figures).
DEFAULT_MODES = ("int4",)


def use_compiled_by_default(model: nn.Module) -> bool:
    """Whether ``LLM.load(..., compile=None)`` decodes ``model`` through the compiled step when
    ``$SCRATCHLM_COMPILE`` is not set: a decoder-only ``Transformer`` (causal, pre-norm: what ``static_step``
    computes) on the CPU, whose quantization is one of ``DEFAULT_MODES``.

    Its packages are then built by a background process (``scratchlm.aot_background``): the first run on a
    machine decodes eagerly and says so in one line, later runs load the package in milliseconds."""
    cfg = getattr(model, "config", None)
    if not isinstance(model, Transformer) or cfg is None or not cfg.causal or cfg.norm_position != "pre" \
            or cfg.type_vocab_size:
        return False
    if not all(p.device.type == "cpu" for p in model.parameters()):
        return False
    mode = (getattr(model, "quantization", None) or {}).get("mode", "dense")
    return mode in DEFAULT_MODES
