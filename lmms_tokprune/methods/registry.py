"""The method registry: names, stages, validated hyper-parameters and the `compress` entry point.

Each method module declares one `MethodSpec`. The stage says *where* a method acts (before the
projector, or also inside CLIP / the LLM); the function says *what* it computes. Hyper-parameter
names map one-to-one to the papers' and every value is validated here, so a typo or an impossible
budget is a `ValueError` naming the problem instead of a crash deep inside torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import numbers
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from ..catalog import BOTH_VARIANTS, METHODS, STAGE_IN_CLIP_AND_LLM, STAGE_PRE_PROJECTOR, method_entry  # noqa: F401 (re-exported stages)
from ..coerce import is_none_word, to_kind, to_list
from .inputs import CompressedImage, UnitLayout, VisionInputs

VARIANTS = BOTH_VARIANTS
# All methods we know about, in the order users see them; module that implements each (from the catalog).
METHOD_MODULES: Dict[str, str] = {m.name: m.module for m in METHODS}


def _no_check(value: Any) -> Optional[str]:
    return None


# How much of an input tensor a method reads, for the NaN / inf check (MethodSpec.reads; a tensor not listed: READ_ALL).
# A NaN or inf where a method does not read cannot change its output, so only what it reads is checked, and a NaN / inf
# there is a ValueError naming the tensor all the same.
READ_ALL = "all"  # every entry: validate_inputs scans the tensor
READ_CLS_ROW = "cls_row"  # token 0 only (the CLS query row of q / feature_q): validate_inputs scans that row
READ_LOGITS = "logits"  # fixed: the keys, checked through the CLS logits they make (signals.cls_logits(keys=...)); reference: all
READ_KEPT_ROWS = "kept_rows"  # fixed: hidden at the kept rows only, checked on the gathered rows (baselines.gather_sorted(
#                               check=...)); reference: all
_CHECKED_BY_THE_METHOD = (READ_LOGITS, READ_KEPT_ROWS)


@dataclass(frozen=True)
class Param:
    """One hyper-parameter: default, type used to coerce strings, a range check and a doc line."""

    default: Any
    kind: type
    doc: str
    check: Callable[[Any], Optional[str]] = _no_check  # returns an error text or None
    choices: Optional[Tuple[Any, ...]] = None
    item: Optional[type] = None  # kind=tuple: the type of each item (a list parameter)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: what it computes (`fn`) and where it acts (`stage`)."""

    name: str
    fn: Callable[..., List[CompressedImage]]  # fn(inp, variant=..., **params) -> list per image
    doc: str
    params: Mapping[str, Param] = field(default_factory=dict)
    # what it reads: "qk" (last block q/k), "last_hidden", "text" (recover's text_embeds + visual_projection),
    # "feature_qk" (feature block q/k + num_heads), "projected", "patch_embeds", "text_segments";
    # "cls": CLIP's CLS token (its attention row, or the token itself): units without one are refused
    needs: frozenset = frozenset()
    # The released code compresses one image per call and crashes on more: reference runs image by image
    # (a multi-image document too) and a harness batch > 1 is refused at load time.
    reference_batch_one: bool = False
    budget_sets: Tuple[str, ...] = ()  # released parameters that budget=N maps to (giving both is an error)
    reference_short: bool = False  # reference may return fewer than `budget` tokens, where the released code does
    # fixed honours VisionInputs.valid (invalid patches never kept nor merged) and .budgets (exact count per unit)
    unit_aware: bool = False
    # methods that prune inside the LLM: plan(context, variant=..., **params) -> methods.llm_stages.LLMPlan
    plan: Optional[Callable[..., Any]] = None
    # how much of each input tensor it reads (READ_*; absent = READ_ALL): the NaN / inf check covers that much
    reads: Mapping[str, str] = field(default_factory=dict)

    @property
    def stage(self) -> str:
        """Where the method acts (the catalog says; the module only says what it computes)."""
        return method_entry(self.name).stage

    @property
    def variants(self) -> Tuple[str, ...]:
        return method_entry(self.name).variants

    @property
    def needs_qk(self) -> bool:
        return "qk" in self.needs

    @property
    def needs_cls(self) -> bool:
        """The method reads CLIP's CLS token (its attention row over the patches, or the token itself)."""
        return "cls" in self.needs

    @property
    def needs_text_encoder(self) -> bool:
        """The method reads something only a CLIP text encoder checkpoint provides (text tower, visual_projection)."""
        return bool({"text", "patch_embeds", "text_segments"} & self.needs)

    @property
    def needs_last_block(self) -> bool:
        """The last CLIP block's output is read (directly, or projected for text similarity)."""
        return bool({"last_hidden", "text"} & self.needs)


def positive_int(value: Any) -> Optional[str]:
    return None if value is None or (isinstance(value, int) and value >= 1) else "must be an integer >= 1"


def required_positive_int(value: Any) -> Optional[str]:
    """A budget the method cannot run without (the released default keeps every token)."""
    if value is None:
        return "is required: give budget=N (the released default, 576, keeps every token)"
    return positive_int(value)


def unit_interval(value: Any) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or math.isnan(float(value)) or not 0.0 < float(value) <= 1.0:
        return "must be in (0, 1]"
    return None


# Matched-budget and ratio parameters every method accepts (meaning per method, see METHODS.md).
BUDGET = Param(None, int, "exact number of visual tokens per image (merged/extra tokens count)", positive_int)
RATIO = Param(None, float, "fraction of the N patches to keep (per-method meaning)", unit_interval)
EQUIVALENT_BUDGET = Param(None, int, "equivalent visual tokens per image: the mean over decoder layers of the visual tokens each "
                          "computes on (input counting), mapped to the nearest released setting", positive_int)
REQUIRED_BUDGET = Param(None, int, "exact number of visual tokens per image (required; released visual_token_num)", required_positive_int)

_SPECS: Dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name not in METHOD_MODULES:
        raise ValueError(f"method {spec.name!r} is not listed in METHOD_MODULES")
    _SPECS[spec.name] = spec
    return spec


def method_names() -> List[str]:
    return list(METHOD_MODULES)


def get_method(name: str) -> MethodSpec:
    """Look a method up by name; unknown or unimplemented names are a ValueError."""
    if not isinstance(name, str) or name not in METHOD_MODULES:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHOD_MODULES)}")
    if name not in _SPECS:
        try:
            importlib.import_module(f"{__package__}.{METHOD_MODULES[name]}")
        except ModuleNotFoundError as err:
            if err.name != f"{__package__}.{METHOD_MODULES[name]}":
                raise
    if name not in _SPECS:
        raise ValueError(f"method {name!r} is not implemented yet in this version of lmms_tokprune")
    return _SPECS[name]


def coerce_param(method: str, key: str, param: Param, value: Any) -> Any:
    """Turn a string/number from model_args or YAML into the parameter's type, strictly.

    An empty value is an error; `none` means None only where the parameter's default is None (floats must also
    be finite: resolve_params checks that after the parameter's own range check).
    """
    if isinstance(value, str) and not value.strip():
        raise ValueError(f"{method}: parameter {key!r} is empty; give a value or leave the key out (default {param.default!r})")
    if is_none_word(value):
        if param.default is not None:
            raise ValueError(f"{method}: parameter {key!r} must be of type {param.kind.__name__}, got {value!r} "
                             f"(none is only allowed where the default is none; default {param.default!r})")
        return None
    try:
        if param.kind is tuple:
            return to_list(value, param.item or float)
        return to_kind(param.kind, value)
    except ValueError as err:
        kind = f"list of {(param.item or float).__name__}" if param.kind is tuple else param.kind.__name__
        detail = f" ({err})" if param.kind is tuple else ""
        raise ValueError(f"{method}: parameter {key!r} must be of type {kind}, got {value!r}{detail}") from None


def did_you_mean(key: str, valid: Any) -> str:
    """' (did you mean 'budget'?)' for a near miss, else ''."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def non_negative(value: Any) -> Optional[str]:
    """A finite number >= 0 (None passes: only parameters whose default is None can be None)."""
    if value is None:
        return None
    return None if isinstance(value, (int, float)) and math.isfinite(float(value)) and value >= 0 else "must be a finite number >= 0"


def resolve_params(method: str, variant: str = "fixed", **params: Any) -> Dict[str, Any]:
    """Validate `params` against the method's schema and fill defaults.

    Raises ValueError naming the bad key or value and listing the valid choices.
    """
    spec = get_method(method)
    if variant not in spec.variants:
        raise ValueError(f"{method}: unknown variant {variant!r}; valid variants: {', '.join(spec.variants)}")
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        valid = ", ".join(spec.params) or "(none)"
        hints = "".join(did_you_mean(k, spec.params) for k in unknown)
        raise ValueError(f"{method}: unknown parameter(s) {', '.join(unknown)}; valid parameters: {valid}{hints}")
    resolved: Dict[str, Any] = {}
    for key, param in spec.params.items():
        value = coerce_param(method, key, param, params[key]) if key in params else param.default
        if param.choices is not None and value not in param.choices:
            raise ValueError(f"{method}: parameter {key!r}={value!r} is not one of {', '.join(map(str, param.choices))}")
        problem = param.check(value)
        floats = value if isinstance(value, tuple) else (value,)
        if not problem and any(isinstance(v, float) and not math.isfinite(v) for v in floats):
            problem = "must be a finite number"
        if problem:
            raise ValueError(f"{method}: parameter {key!r}={value!r} {problem}")
        resolved[key] = value
    if resolved.get("budget") is not None and resolved.get("ratio") is not None:
        raise ValueError(f"{method}: give either budget or ratio, not both")
    clash = [k for k in spec.budget_sets if k in params] if resolved.get("budget") is not None else []
    if clash:
        raise ValueError(f"{method}: budget={resolved['budget']} sets {', '.join(spec.budget_sets)}; give either budget or "
                         f"{', '.join(clash)}, not both")
    return resolved


def _check_tensor(name: str, t: Optional[torch.Tensor], batch: Optional[int], rank: int, reads: str = READ_ALL) -> None:
    """Type, rank, batch size (when `batch` is given) and finiteness of one input tensor, over the part the method
    reads (`reads`: all of it, its CLS row, or nothing here: the method checks what it reads itself)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"VisionInputs.{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank or (batch is not None and t.shape[0] != batch):
        raise ValueError(f"VisionInputs.{name} has shape {tuple(t.shape)}; expected {rank} dims with batch {batch}")
    if reads in _CHECKED_BY_THE_METHOD or not t.is_floating_point() or not t.numel():
        return
    part = t[:, 0] if reads == READ_CLS_ROW else t
    # One reduction instead of an elementwise mask: a NaN or inf anywhere makes the float32 sum non-finite
    # (features would need |x| ~ 1e34 to overflow it), at a fraction of isfinite(t).all()'s cost.
    if not bool(torch.isfinite(part.sum(dtype=torch.float32))):
        raise ValueError(f"VisionInputs.{name} contains NaN or inf")


def validate_inputs(spec: MethodSpec, inp: VisionInputs, variant: str = "reference") -> None:
    """Shapes, presence of what the method needs, and finiteness (NaN/inf is an error, not noise) of what it reads
    (MethodSpec.reads: a `fixed` variant checks its keys through its logits and hidden at its kept rows itself;
    `reference` runs the released code, unchanged, so every tensor it reads is scanned here)."""
    if not isinstance(inp, VisionInputs):
        raise ValueError(f"compress expects VisionInputs, got {type(inp).__name__}")
    h = inp.hidden
    if not isinstance(h, torch.Tensor) or h.dim() != 3 or h.shape[1] < (2 if inp.layout is None else 1):
        raise ValueError("VisionInputs.hidden must be [B, 1+N, D] with N >= 1 (CLS first; [B, N, D] for a layout without CLS)")
    _validate_layout(spec, inp)
    batch = h.shape[0]
    reads = _reads(spec, variant)
    _check_tensor("hidden", h, batch, 3, reads("hidden"))
    # Check only what this method reads: a NaN in an unused tensor cannot change its output.
    used = {"q": spec.needs_qk, "k": spec.needs_qk, "last_hidden": spec.needs_last_block}
    for name in ("q", "k", "last_hidden"):
        t = getattr(inp, name)
        _check_tensor(name, t if used[name] else None, batch, 3, reads(name))
        if t is not None and tuple(t.shape[:2]) != tuple(h.shape[:2]):
            raise ValueError(f"VisionInputs.{name} has shape {tuple(t.shape)}, hidden has {tuple(h.shape)}")
    _check_tensor("text_embeds", inp.text_embeds if "text" in spec.needs else None, batch, 2)
    _check_tensor("visual_projection", inp.visual_projection if "text" in spec.needs else None, None, 2)
    if inp.visual_projection is not None and inp.visual_projection.shape[1] != h.shape[2]:
        raise ValueError(f"VisionInputs.visual_projection is {tuple(inp.visual_projection.shape)}; expected [Dt, {h.shape[2]}]")
    if inp.visual_projection is not None and inp.text_embeds is not None and inp.text_embeds.shape[1] != inp.visual_projection.shape[0]:
        raise ValueError(f"VisionInputs.text_embeds width {inp.text_embeds.shape[1]} != visual_projection rows {inp.visual_projection.shape[0]}")
    if "qk" in spec.needs and (inp.q is None or inp.k is None):
        raise ValueError(f"method {spec.name!r} needs the last CLIP block's q and k (VisionInputs.q / .k)")
    if "last_hidden" in spec.needs and inp.last_hidden is None:
        raise ValueError(f"method {spec.name!r} needs VisionInputs.last_hidden (last CLIP block output)")
    if "text" in spec.needs and (inp.text_embeds is None or inp.visual_projection is None):
        raise ValueError(
            f"method {spec.name!r} needs CLIP text guidance: VisionInputs.text_embeds and .visual_projection "
            "(load a text encoder with text_encoder=...)"
        )
    _validate_peer_inputs(spec, inp, batch, reads)
    if inp.image_keys is not None and len(inp.image_keys) != batch:
        raise ValueError(f"VisionInputs.image_keys has {len(inp.image_keys)} entries for a batch of {batch}")


def _reads(spec: MethodSpec, variant: str) -> Callable[[str], str]:
    """name -> how much of that tensor the variant reads and validate_inputs checks (MethodSpec.reads)."""
    def reads(name: str) -> str:
        scope = spec.reads.get(name, READ_ALL)
        return READ_ALL if variant == "reference" and scope in _CHECKED_BY_THE_METHOD else scope

    return reads


def _validate_layout(spec: MethodSpec, inp: VisionInputs) -> None:
    """The units' layout: rows x cols >= 1, `hidden` holds exactly [CLS +] rows*cols tokens, and a method that reads
    CLIP's CLS token gets units that have one."""
    layout = inp.layout
    if layout is not None:
        if not isinstance(layout, UnitLayout):
            raise ValueError(f"VisionInputs.layout must be a UnitLayout or None, got {type(layout).__name__}")
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in (layout.rows, layout.cols)):
            raise ValueError(f"VisionInputs.layout={layout!r}: rows and cols must be integers >= 1")
        tokens = layout.num_patches + int(bool(layout.cls))
        if inp.hidden.shape[1] != tokens:
            cls = "a CLS token + " if layout.cls else ""
            raise ValueError(f"VisionInputs.hidden has {inp.hidden.shape[1]} tokens per unit; layout {layout.rows} x {layout.cols} "
                             f"needs {cls}{layout.num_patches} patches = {tokens}")
        if spec.needs_cls and not layout.cls:
            raise ValueError(f"method {spec.name!r} reads CLIP's CLS token (its attention over the patches), but these units have none "
                             "(layout cls=False), so there is no CLS attention to rank them by")


def _validate_peer_inputs(spec: MethodSpec, inp: VisionInputs, batch: int, reads: Callable[[str], str]) -> None:
    """The peer methods' inputs (PEERS.md): present when declared, shaped like `hidden`, finite where read."""
    h = inp.hidden
    if "feature_qk" in spec.needs:
        for name in ("feature_q", "feature_k"):
            t = getattr(inp, name)
            if t is None:
                raise ValueError(f"method {spec.name!r} needs VisionInputs.{name} (raw q_proj / k_proj outputs of the feature block)")
            _check_tensor(name, t, batch, 3, reads(name))
            if tuple(t.shape) != tuple(h.shape):
                raise ValueError(f"VisionInputs.{name} has shape {tuple(t.shape)}, hidden has {tuple(h.shape)}")
        heads = inp.num_heads
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or h.shape[2] % heads:
            raise ValueError(f"VisionInputs.num_heads={heads!r} must be an integer >= 1 that divides the width {h.shape[2]}")
    for name in ("projected", "patch_embeds"):
        if name in spec.needs:
            t = getattr(inp, name)
            if t is None:
                raise ValueError(f"method {spec.name!r} needs VisionInputs.{name}")
            _check_tensor(name, t, batch, 3)
            if t.shape[1] != inp.num_patches:
                raise ValueError(f"VisionInputs.{name} has {t.shape[1]} rows per image for {inp.num_patches} patches")
    if "text_segments" in spec.needs:
        segs = inp.text_segments
        if segs is None or len(segs) != batch:
            raise ValueError(f"method {spec.name!r} needs VisionInputs.text_segments: one [S, Dt] tensor per image "
                             "(load a CLIP text encoder with text_encoder=...)")
        width = inp.patch_embeds.shape[2] if inp.patch_embeds is not None else None
        for i, t in enumerate(segs):
            _check_tensor(f"text_segments[{i}]", t, None, 2)
            if t.shape[0] < 1 or (width is not None and t.shape[1] != width):
                raise ValueError(f"VisionInputs.text_segments[{i}] has shape {tuple(t.shape)}; expected [S >= 1, {width}]")


def validate_units(spec: MethodSpec, variant: str, inp: VisionInputs, budget: Optional[int]) -> VisionInputs:
    """Valid-patch masks and per-unit budgets (methods/units.py): `valid` [B, N] bool with >= 1 valid patch per unit,
    `budgets` B integers in [1, that unit's valid patches], a scalar `budget` within every unit's valid patches;
    fixed variants of unit-aware methods only. Returns `inp`, with `valid=None` when every patch is valid (the
    methods then run their unmasked path). Cheap: one count over the [B, N] mask, no pass over the features."""
    valid, budgets = inp.valid, inp.budgets
    if valid is None and budgets is None:
        return inp
    given = " / ".join(name for name, value in (("valid-patch masks (VisionInputs.valid)", valid),
                                                 ("per-unit budgets (VisionInputs.budgets)", budgets)) if value is not None)
    if variant == "reference":
        raise ValueError(f"{spec.name} (reference): the released code has no {given}; use variant=fixed")
    if not spec.unit_aware:
        raise ValueError(f"method {spec.name!r} does not take {given} yet")
    b, n = inp.batch_size, inp.num_patches
    counts = [n] * b
    if valid is not None:
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != (b, n):
            shape = f"{valid.dtype} {tuple(valid.shape)}" if isinstance(valid, torch.Tensor) else type(valid).__name__
            raise ValueError(f"VisionInputs.valid must be a bool tensor [B, N] = [{b}, {n}], got {shape}")
        if valid.device != inp.hidden.device:
            raise ValueError(f"VisionInputs.valid is on {valid.device}, hidden on {inp.hidden.device}")
        counts = [int(c) for c in valid.sum(dim=1).tolist()]
        empty = [u for u, c in enumerate(counts) if c < 1]
        if empty:
            raise ValueError(f"VisionInputs.valid: unit {empty[0]} has no valid patch (every unit needs at least 1)")
    if budgets is not None:
        if isinstance(budgets, (str, bytes, torch.Tensor)) or not hasattr(budgets, "__len__") or len(budgets) != b:
            raise ValueError(f"VisionInputs.budgets must be a sequence of {b} integers (one per unit), got {budgets!r}")
        for u, (m, c) in enumerate(zip(budgets, counts)):
            if isinstance(m, bool) or not isinstance(m, numbers.Integral) or not 1 <= m <= c:
                raise ValueError(f"{spec.name}: budgets[{u}]={m!r} must be an integer in [1, {c}]: unit {u} has {c} valid patches")
    elif budget is not None:
        short = [u for u, c in enumerate(counts) if c < budget]
        if short:
            raise ValueError(f"{spec.name}: budget={budget} is more than unit {short[0]}'s {counts[short[0]]} valid patches "
                             "(give per-unit budgets, or a smaller budget)")
    if valid is not None and min(counts) == n:
        inp = dataclasses.replace(inp, valid=None)
    return inp


def check_budget(method: str, budget: Optional[int], n: int) -> None:
    if budget is not None and not 1 <= budget <= n:
        raise ValueError(f"{method}: budget={budget} is outside [1, {n}] (N = {n} patches)")


@dataclass(frozen=True)
class BoundMethod:
    """A method with its variant and fully resolved parameters (defaults filled): validated once, at bind time.

    Calling it compresses a batch: the input tensors are checked (shapes, NaN), the parameters are not
    re-validated. ``given`` names the parameters the user set (labels and logs show those).
    """

    spec: MethodSpec
    variant: str
    params: Mapping[str, Any]
    given: Tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def stage(self) -> str:
        return self.spec.stage

    @property
    def release_half_tower(self) -> bool:
        """`reference` of a method whose released evaluation ran the CLIP tower in fp16 (a LLaVA 1.1.x fork)."""
        return self.variant == "reference" and method_entry(self.name).release_half_tower

    @property
    def needs(self) -> frozenset:
        return self.spec.needs

    @property
    def budget(self) -> Optional[int]:
        return self.params.get("budget")

    @property
    def given_params(self) -> Dict[str, Any]:
        """The parameters the user set, coerced (what configs and labels carry)."""
        return {k: self.params[k] for k in self.given}

    def llm_plan(self, context: Any) -> Any:
        """The method's cuts inside the LLM for a decoder of context.num_layers layers (methods/llm_stages.py)."""
        if self.spec.plan is None:
            raise ValueError(f"method {self.name!r} does not prune inside the LLM")
        return self.spec.plan(context, variant=self.variant, **self.params)

    def check_patches(self, n: int) -> None:
        """The budget must fit the model's N patches (known once a checkpoint is opened)."""
        check_budget(self.name, self.budget, n)

    def __call__(self, inp: VisionInputs) -> List[CompressedImage]:
        validate_inputs(self.spec, inp, self.variant)
        inp = validate_units(self.spec, self.variant, inp, self.budget)
        if inp.budgets is None:  # per-unit budgets replace the scalar one (validated above, unit by unit)
            self.check_patches(inp.num_patches)
        with torch.no_grad():
            outs = self.spec.fn(inp, variant=self.variant, **self.params)
        if len(outs) != inp.batch_size:  # a method bug, never user input
            raise RuntimeError(f"{self.name} returned {len(outs)} outputs for {inp.batch_size} units")
        expected = inp.budgets if inp.budgets is not None else None if self.budget is None else [self.budget] * len(outs)
        if expected is not None and not (self.variant == "reference" and self.spec.reference_short):
            for out, want in zip(outs, expected):
                if out.num_tokens != want:  # a method bug, never user input
                    raise RuntimeError(f"{self.name} returned {out.num_tokens} tokens for budget {want}")
        return outs


def bind(method: str, variant: str = "fixed", **params: Any) -> BoundMethod:
    """Validate a method, variant and parameters once; the result runs without re-validating them."""
    spec = get_method(method)
    resolved = resolve_params(method, variant, **params)
    return BoundMethod(spec, variant, MappingProxyType(resolved), tuple(k for k in spec.params if k in params))


def compress(method: str, inp: VisionInputs, variant: str = "fixed", **params: Any) -> List[CompressedImage]:
    """Compress each image of `inp` with `method`; returns one CompressedImage per image."""
    return bind(method, variant, **params)(inp)
