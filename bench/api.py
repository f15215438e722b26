"""The seams of otbench: what a task hands a method, and what a method must offer.

A *task* produces a :class:`TaskData` (tensors only, already on the CPU, images scaled to
[-1, 1]).  A *method* is a subclass of :class:`Method`: the runner calls ``setup`` (build
networks for this data), optionally ``load_state_dict`` (resume), ``fit`` (train, using the
:class:`~bench.context.FitContext` for device, budget, progress and checkpoints) and then ``transport``
on batches of test sources.  Nothing in here knows about any particular method or task.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from .data import DataFile, ensure
from .errors import BenchError  # noqa: F401  (re-exported: plugins import it from bench.api)
from .options import resolve, upgrade

UNPAIRED = "unpaired"
SEMI_PAIRED = "semi-paired"
SETTINGS = (UNPAIRED, SEMI_PAIRED)
# the keys of Method.state_dict that are not attributes
_RESERVED_STATE = ("__extra__", "__optim__")


class Metric(str):
    """A metric column a task reports: the row key (this string) plus how tables show, rank and check it.

    ``Metric("fid", "FID", higher_is_better=False, bounds=(0, inf), sample_size="fid_n")`` compares equal to
    ``"fid"``, so rows and code that index by key keep working; tables read ``header``, ``higher_is_better``,
    ``digits`` and ``sample_size`` (the row key holding how many samples the value was computed on, shown beside
    it); the runner and the row schema treat a value outside ``bounds`` (both ends included) as a broken run.  A
    metric declares these: nothing is guessed from its name (default: any finite number, no sample size shown).
    """

    header: str
    higher_is_better: bool
    digits: int
    bounds: tuple[float, float]
    sample_size: str | None

    def __new__(cls, key: str, header: str | None = None, higher_is_better: bool = False, digits: int = 2,
                bounds: tuple[float, float] = (-math.inf, math.inf), sample_size: str | None = None):
        obj = super().__new__(cls, key)
        obj.header, obj.higher_is_better, obj.digits = header or key, bool(higher_is_better), int(digits)
        lo, hi = float(bounds[0]), float(bounds[1])
        if not lo <= hi:
            raise TypeError(f"Metric {key!r}: bounds {bounds!r} must be (low, high) with low <= high")
        obj.bounds = (lo, hi)
        obj.sample_size = sample_size
        return obj

    @property
    def key(self) -> str:
        return str(self)

    def __reduce__(self):
        return (Metric, (str(self), self.header, self.higher_is_better, self.digits, self.bounds, self.sample_size))


# the bounds of the common kinds of metric column
PERCENT = (0.0, 100.0)
DISTANCE = (0.0, math.inf)
CORRELATION = (-1.0, 1.0)


@dataclass
class TaskData:
    """Everything a method may see about a task (tensors on the CPU).

    Images are float32 in [-1, 1] with shape (N, C, H, W); vector tasks use (N, D).
    ``pairs`` holds the guiding (keypoint) pairs as two aligned tensors (K, ...) for a
    semi-paired task, else ``None``.  Labels are given for evaluation and for oracles;
    a method that is not an oracle must not read them (the contract test checks that the
    registered methods declare it).
    """

    name: str
    setting: str
    source_train: torch.Tensor
    target_train: torch.Tensor
    source_test: torch.Tensor
    target_test: torch.Tensor
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None
    source_train_labels: torch.Tensor | None = None
    target_train_labels: torch.Tensor | None = None
    source_test_labels: torch.Tensor | None = None
    target_test_labels: torch.Tensor | None = None
    aligned: bool = False  # source and target share geometry pixel for pixel (super-resolution)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.target_train.shape[1:])

    @property
    def source_shape(self) -> tuple[int, ...]:
        return tuple(self.source_train.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.target_train.dim() == 4

    @property
    def kind(self) -> str:
        """"image" or "vector": which of each option's two values (``Option(vector=...)``) a method reads."""
        return "image" if self.is_image else "vector"

    def describe(self) -> str:
        k = 0 if self.pairs is None else len(self.pairs[0])
        return (f"{self.name}: {self.setting}, source {tuple(self.source_train.shape)}, "
                f"target {tuple(self.target_train.shape)}, test {len(self.source_test)}, pairs {k}")


class Method:
    """Base class of every method plugin.

    Subclasses set the class attributes and implement ``setup``, ``fit`` and ``transport``.
    Options arrive as keyword arguments (``bench run --opt name=value``) and must be
    JSON-serialisable; they are recorded in every result row.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = "Other"  # "OT", "Diffusion", "Flow", "GAN", "Reference", ...
    settings: ClassVar[tuple[str, ...]] = (UNPAIRED,)
    stochastic: ClassVar[bool] = False
    oracle: ClassVar[bool] = False  # uses labels: marked in every table
    uses_pairs: ClassVar[bool] = False  # reads TaskData.pairs
    paper: ClassVar[str] = ""
    notes: ClassVar[str] = ""  # shown by `bench list`: adaptations, what is ignored
    # what this implementation was checked against (the authors' repository at a commit, or the paper's
    # sections), and each algorithmic difference from it that no option's ``authors=`` value covers, one line
    # each with its reason; `bench deviations` renders both with every option whose value differs from
    # the authors'.  An empty ``deviations`` with a ``compared_against`` reads "none found".
    compared_against: ClassVar[str] = ""
    deviations: ClassVar[tuple[str, ...]] = ()
    # options at which the shared contract suite (tests/test_contract.py, tests/test_state.py) trains the method
    # in seconds; ``behaviour_options``: the options at which its behavioural contract test expects it to learn
    test_options: ClassVar[dict[str, Any]] = {}
    behaviour_options: ClassVar[dict[str, Any] | None] = None
    # the loop whose progress a learning curve follows (``bench run --probe-every N``); None: no curve
    probe_loop: ClassVar[str | None] = None
    # the learning curve the scripts draw (``--probe-every N --probe-n M``; scripts/cpu_table.sh reads "cpu"):
    # budget -> steps of ``probe_loop`` between two points (a budget missing: no curve), and the evaluation
    # sources each point transports
    probe_every: ClassVar[dict[str, int]] = {}
    probe_n: ClassVar[int] = 200
    # the README's digits `cpu` table (scripts/readme_table.py): the row's label, naming the settings of the `cpu`
    # run (empty: the name), what its sample grids show (written by whoever looked at them; empty: "not yet
    # viewed"), and its place (lower first, ties by name; references come after every other method)
    readme_label: ClassVar[str] = ""
    readme_grids: ClassVar[str] = ""
    readme_order: ClassVar[int] = 100
    # name -> value or bench.options.Option (a type and one value per budget); see bench/options.py
    default_options: ClassVar[dict[str, Any]] = {}
    # options added after rows were stored, each with the value that reproduces the code before it existed:
    # a stored row without the key is read as having that value (tables then still count it as a run of
    # today's defaults while the default is that value); any other missing option labels the row "name=unset"
    options_before: ClassVar[dict[str, Any]] = {}
    # former option names -> today's: rows and run directories stored under a former name read as today's
    # (bench.options.upgrade; `bench upgrade` moves run directories to the hash of today's names); a value may be
    # (name, {old value: new value}) where the values changed form too
    renamed_options: ClassVar[dict[str, Any]] = {}
    # the attributes that are this method's state: what a checkpoint saves and a resume (or ``bench eval``) restores
    # into a freshly set-up instance.  An nn.Module is saved by its state_dict, a tensor as it is, None as None
    # (a configuration without that part); ``setup`` must create every one.  Besides these a checkpoint holds
    # ``self.extra_state`` (plain values) and the optimizers registered with ``self.optimizer``, and nothing else:
    # what ``setup`` derives from the task's data (a copy of the training images, a nearest-neighbour index) is
    # rebuilt there and never written, so it does not swell every checkpoint.  Declare what ``fit`` changes and a
    # resume cannot recompute (networks, EMA copies, a stored plan, a trainer's random state).
    state_attrs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, budget: str = "smoke", kind: str = "image", **options: Any) -> None:
        self.budget, self.kind = str(budget), str(kind)
        self.refuse_former_names(options)
        self.given_options = dict(options)
        # every option's value for this budget and kind of task (images or vectors), typed and validated: what the
        # row records
        self.options = resolve(f"method {self.name!r}", self.default_options, options, self.budget, self.kind)
        self.is_image = self.kind == "image"
        self.device = torch.device("cpu")
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        self._pending_optim: dict[str, Any] = {}

    @classmethod
    def refuse_former_names(cls, given: dict[str, Any]) -> None:
        """A one-line BenchError naming today's option for a former name (``renamed_options``, or a ``toy_X`` /
        ``image_X`` twin that one option with a vector value replaced)."""
        for key in given:
            if key in cls.default_options:
                continue
            kind = "vector" if key.startswith("toy_") else "image" if key.startswith("image_") else None
            if key not in cls.renamed_options and kind is None:
                continue
            today = sorted(upgrade(cls.default_options, {key: given[key]}, kind or "image", cls.renamed_options))
            today = [t for t in today if t in cls.default_options]
            if not today:
                continue
            why = (f"is now {today[0]}" if kind is None else
                   f"is gone: one option serves images and vectors, with its own value on {kind} tasks")
            raise BenchError(f"method {cls.name!r} option {key} {why}; pass "
                             + " or ".join(f"--opt {cls.name}.{t}=..." for t in today) + " instead")

    @classmethod
    def resolve_options(cls, budget: str, options: dict[str, Any], kind: str = "image") -> dict[str, Any]:
        return resolve(f"method {cls.name!r}", cls.default_options, options, budget, kind)

    # -- optimizers: one checkpoint mechanism for every plugin ------------------------------
    def optimizer(self, name: str, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Register ``opt`` under ``name``: its state is checkpointed with the method and, after a
        resume, restored here (create optimizers in ``fit`` and pass them through this)."""
        if name in self._pending_optim:
            opt.load_state_dict(self._pending_optim.pop(name))
        self._optimizers[name] = opt
        return opt

    # -- declared properties -------------------------------------------------------------
    @property
    def nfe(self) -> int:
        """Network function evaluations per transported sample (0 for non-neural rows)."""
        return 1

    def check_kind(self, data: TaskData) -> None:
        """A one-line BenchError when ``data`` is not the kind of task (image or vector) whose option values this
        instance resolved: call it first in ``setup``."""
        if data.kind != self.kind:
            raise BenchError(f"method {self.name!r} was built with its {self.kind} options and {data.name!r} is "
                             f"a{'n' if data.kind == 'image' else ''} {data.kind} task: build it with "
                             f"kind={data.kind!r} (RunSpec and `bench run` pass the task's kind)")

    def check_setting(self, data: TaskData) -> None:
        self.check_kind(data)
        if data.setting not in self.settings:
            raise BenchError(
                f"method {self.name!r} does not support the {data.setting} setting of task "
                f"{data.name!r} (it supports: {', '.join(self.settings)}); pick another task or method")

    # -- lifecycle -------------------------------------------------------------------------
    def setup(self, data: TaskData, run) -> None:
        """Build networks and buffers for ``data``; called before ``load_state_dict``/``fit``."""

    def fit(self, data: TaskData, run) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def transport(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Map a batch of source samples (on ``self.device``) to target-domain samples."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> "Method":
        """Move every nn.Module / tensor attribute to ``device``: the declared state and also what ``setup`` derived
        from the data (moving is not checkpointing: transport needs those buffers on the device too)."""
        device = torch.device(device)
        for key, value in vars(self).items():
            if isinstance(value, (torch.nn.Module, torch.Tensor)):
                setattr(self, key, value.to(device))
        for opt in self._optimizers.values():  # Adam moments follow their parameters
            for st in opt.state.values():
                for k, v in st.items():
                    if isinstance(v, torch.Tensor) and k != "step":
                        st[k] = v.to(device)
        self.device = device
        return self

    def declared_state(self) -> dict[str, Any]:
        """The declared state attributes (``state_attrs``) and their current values; a one-line BenchError for a
        declaration that names no attribute of this instance or a value that is no state."""
        names = type(self).state_attrs
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise BenchError(f"method {self.name!r}: state_attrs must be a tuple of attribute names, got {names!r}")
        out: dict[str, Any] = {}
        for key in names:
            if key in out or key in _RESERVED_STATE:
                raise BenchError(f"method {self.name!r}: state_attrs names {key!r} twice or names a reserved key")
            if key not in vars(self):
                raise BenchError(f"method {self.name!r} declares state attribute {key!r} (state_attrs), but the "
                                 f"instance has no attribute {key!r}: create it in setup() (None where this "
                                 f"configuration has none) or remove it from state_attrs")
            value = getattr(self, key)
            if value is not None and not isinstance(value, (torch.nn.Module, torch.Tensor)):
                raise BenchError(f"method {self.name!r}: state attribute {key!r} is a {type(value).__name__}, not an "
                                 f"nn.Module, a tensor or None; keep plain values in self.extra_state")
            out[key] = value
        return out

    def state_dict(self) -> dict[str, Any]:
        """The declared state (``state_attrs``: a module's state_dict, a tensor, None), ``self.extra_state`` and the
        registered optimizers' states."""
        state: dict[str, Any] = {}
        for key, value in self.declared_state().items():
            state[key] = value.state_dict() if isinstance(value, torch.nn.Module) else value
        state["__extra__"] = getattr(self, "extra_state", {})
        state["__optim__"] = {**self._pending_optim,
                              **{k: opt.state_dict() for k, opt in self._optimizers.items()}}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved into this set-up instance.  A key that is no declared attribute is
        ignored (a checkpoint written when more was saved); a declared attribute missing from ``state`` is a
        KeyError (the checkpoint does not fit), unless the attribute is None here (nothing to restore)."""
        declared = self.declared_state()
        for key, current in declared.items():
            if key not in state:
                if current is None:
                    continue
                raise KeyError(f"the checkpoint has no {key!r}, which method {self.name!r} declares as state")
            value = state[key]
            if isinstance(current, torch.nn.Module):
                if value is None:
                    raise ValueError(f"the checkpoint has no {key!r} network (None), which method "
                                     f"{self.name!r} has in this configuration")
                current.load_state_dict(value)
            elif isinstance(value, (torch.nn.Module, dict)):
                raise ValueError(f"the checkpoint holds a network for {key!r}, which method {self.name!r} "
                                 f"does not have in this configuration")
            else:
                setattr(self, key, value.to(self.device) if isinstance(value, torch.Tensor) else value)
        if "__extra__" in state:
            self.extra_state = dict(state["__extra__"])
        if "__optim__" in state:
            self._pending_optim = dict(state["__optim__"])
            for name, opt in list(self._optimizers.items()):
                if name in self._pending_optim:
                    opt.load_state_dict(self._pending_optim.pop(name))

    # -- hooks the tasks and the contract suite read (each optional: the default says "not offered") ----------------
    def diagnostics(self) -> dict[str, float] | None:
        """Scalars about the fitted model, stored in the row as ``bound_<name>`` columns (OTCS: its Theorem 2
        terms; DDIB: its cycle error; ReFlow: straightness)."""
        return None

    def conditional_plan(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """The learned coupling pi(.|x) over ``targets`` for each source in ``x``: (len(x), len(targets)), rows
        summing to 1; None for a method without an explicit coupling.  The digits task scores it as ``plan_acc``,
        the toy tasks as ``plan_w2``."""
        return None

    def ot_problem(self) -> dict[str, Any] | None:
        """The regularised OT problem the method solves (``epsilon``, and the cost's pieces), so that a task with an
        exact solver compares the learned plan with that problem's exact plan; None: the task's default problem."""
        return None

    def plan_metrics(self, data: TaskData) -> dict[str, Any]:
        """Row columns about the plan that need the task's labels (used only to score, e.g. OTCS's exact plan's
        class accuracy and each side's relation accuracy); {} when the method has none."""
        return {}


@dataclass
class EvalContext:
    """What a task's ``evaluate`` may use besides the samples.

    ``transport(x)`` maps extra source batches with the fitted method (seeded, batched, on the
    run's device), e.g. to draw many samples per source on a toy task; ``method`` is the fitted
    method itself (read-only use, e.g. its coupling on toy tasks); ``cache_dir`` is where a task
    keeps reference statistics and classifiers.
    """

    cache_dir: Any
    device: torch.device
    budget: Any
    seed: int
    method: Any = None
    transport: Any = None
    data_root: Any = None


class Task:
    """Base class of every task plugin.

    A task declares its metric columns (:class:`Metric`: header, direction, digits), the paper's
    values (``paper_values``), its options (``default_options``, resolved like a method's;
    ``--task-opt``), the files it reads (``data_files``) and how to verify its data (``check_data``,
    by default those files' sha256).  Adding a task never edits the engine.
    """

    name: ClassVar[str] = ""
    setting: ClassVar[str] = UNPAIRED
    # "image" (N, C, H, W) or "vector" (N, D): which value of each method option (``Option(vector=...)``) applies
    kind: ClassVar[str] = "image"
    metrics: ClassVar[tuple[Metric, ...]] = ()
    description: ClassVar[str] = ""
    # published values, {registry method name: {metric: value}}, printed beside measured cells; the task says
    # where they come from (e.g. ``bench.paper.csv_column(its CSV, its column, names=...)``)
    paper_values: ClassVar[dict[str, dict[str, float]]] = {}
    paper_source: ClassVar[str] = ""  # the publication of ``paper_values``, named in every table's legend
    # evaluation sizes per budget: number of test sources transported and scored (None: all)
    eval_sizes: ClassVar[dict[str, int | None]] = {"smoke": 256, "cpu": None, "fast": None, "paper": None}
    default_options: ClassVar[dict[str, Any]] = {}
    # the files of the data root this task reads (path, size, sha256, download source): what the default
    # check_data, and so `bench data [--download]`, verifies or fetches
    data_files: ClassVar[tuple[DataFile, ...]] = ()

    @classmethod
    def table_notes(cls, rows: list[dict[str, Any]]) -> list[str]:
        """Paragraphs a table of these stored rows adds under itself, about what this task's protocol knows of them
        (the digits task: rows scored by different judges); [] by default."""
        return []

    @classmethod
    def row_label(cls, row: dict[str, Any]) -> str:
        """A label for a stored row that this task's protocol must not average with the others (e.g. a row scored
        by another judge than the one the task pins); '' for a comparable row.  Tables add it to the row's variant."""
        return ""

    def __init__(self, **options: Any) -> None:
        # task options do not depend on the budget (a budget never changes the protocol)
        self.options = resolve(f"task {self.name!r}", self.default_options, options, "smoke")

    def load(self, data_root, seed: int, budget: str = "smoke") -> TaskData:
        raise NotImplementedError

    def check_data(self, data_root, download: bool = False) -> dict[str, Any]:
        """Verify the data root (raise a one-line BenchError naming what is missing); return facts."""
        if not self.data_files:
            return {}
        found = ensure(Path(data_root), self.data_files, download=download)
        return {"verified files": len(found)}

    def evaluate(self, data: TaskData, sources: torch.Tensor, outputs: torch.Tensor,
                 labels: torch.Tensor | None, ctx: EvalContext) -> dict[str, Any]:
        """Score ``outputs`` (the transported ``sources``, test split order, CPU tensors).

        Returns a flat dict of JSON-serialisable values: metric columns (e.g. ``fid``,
        ``fid_n``, ``acc``) and their protocol facts (reference split, network sha256).
        """
        raise NotImplementedError

    def images_to_score(self, data: TaskData, outputs: torch.Tensor) -> torch.Tensor:
        """``outputs`` as float32 CPU images clamped to [-1, 1], after checking that they have the target test
        images' shape (a one-line error naming both shapes otherwise)."""
        want = tuple(data.target_test.shape[1:])
        if tuple(outputs.shape[1:]) != want:
            raise BenchError(f"{self.name} outputs must be (N,{','.join(map(str, want))}), got {tuple(outputs.shape)}")
        return outputs.detach().float().cpu().clamp(-1, 1)

    def probe(self, data: TaskData, sources: torch.Tensor, outputs: torch.Tensor,
              labels: torch.Tensor | None, ctx: EvalContext) -> dict[str, float] | None:
        """Cheap metrics for a learning curve during training (no FID); None: not supported."""
        return None

    def info(self, data_root, cache_dir) -> dict[str, Any]:
        """Extra facts for `bench list --tasks` (e.g. the classifier's own accuracy)."""
        return {}
