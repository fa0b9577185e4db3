"""The work behind the HRTEM signal methods: thin callers of the segmentation core.

Every method hands the signal's data to
:func:`napari_hrtem_transfer.segmentation.segment` (imported on first use, so torch is
loaded only then) and puts the result back on the signal's own axes:

- a result with the image's shape (mask, probability) is built with
  ``signal._deepcopy_with_new_data``, so navigation and signal axes (names, units, scales,
  offsets, non-uniform axes), ``metadata`` and ``original_metadata`` are the input's;
- a per-frame result (OOD score, loss, Dice, IoU) is a signal over the navigation axes
  (``signal._get_navigation_signal``): a defocus x image stack gives a 2-D map, a single
  image a one-value signal.

Lazy signals are processed chunk by chunk with :func:`dask.array.map_blocks` (the signal
axes of each chunk are whole frames) and the results stay lazy until computed.

The methods of :mod:`.signals` hold the public signatures (the one home of the defaults) and
docs; each function here takes the method's arguments by the same names, keyword-only.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import numpy as np

from ..errors import ConfigError, ReaderError

#: ``metadata`` node where the methods record what they did.
NODE = "HRTEM_transfer"

MASK_QUANTITY = "Particle mask (1 = particle)"
PROBA_QUANTITY = "Particle probability"
OOD_QUANTITY = "OOD score (0 = training-like; treat with caution above the model's caution level)"


# ----------------------------------------------------------------------------- helpers


def signal_name(s: Any) -> str:
    """A name for messages: the title, else the original file name, else 'signal'."""
    title = str(s.metadata.get_item("General.title", "") or "").strip()
    if title:
        return title
    fname = str(s.metadata.get_item("General.original_filename", "") or "").strip()
    return fname or "signal"


def sampling_A(s: Any, *, warn: bool = True) -> float | None:
    """Pixel size [Å/px] of an image signal, by the reader's rules (x pixel size).

    Raises
    ------
    ReaderError
        If the signal is not an image (signal dimension != 2) or its axes are in reciprocal
        units or angles (a diffraction pattern).
    """
    from ..io import geometry

    name = signal_name(s)
    am = s.axes_manager
    if am.signal_dimension != 2:
        raise ReaderError(
            f"signal '{name}' has {am.signal_dimension} signal axes; the HRTEM methods need "
            "an image (two signal axes), not a spectrum. Use s.as_signal2D(...) or pick an "
            "image signal."
        )
    y, x = (geometry.axis_dict(a) for a in am.signal_axes[::-1])
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            if not warn:
                warnings.simplefilter("ignore", geometry.ReaderWarning)
            value = geometry.calibration(y, x, f"signal '{name}'", notes, allow_reciprocal=False)
    except geometry.NotAnImage as exc:
        raise ReaderError(
            f"signal '{name}': {exc}. Segment the real-space image, not its diffraction "
            "pattern or FFT."
        ) from exc
    if value is None and warn:
        warnings.warn(
            f"signal '{name}' has no real-space calibration (signal axes without length "
            "units); the model's own pixel size is assumed. Calibrate the axes "
            "(s.axes_manager.signal_axes[i].scale/units) or pass sampling_A=... [Å/px].",
            geometry.ReaderWarning,
            stacklevel=4,
        )
    return value


def _pixel_size(s: Any, override: float | None) -> float | None:
    """The pixel size handed to the core; checks the signal is a real-space image.

    An eager signal goes to the core whole, and the core warns (naming it) when the pixel
    size is unknown; a lazy one goes chunk by chunk, so the warning is given here, once.
    """
    value = sampling_A(s, warn=bool(s._lazy) and override is None)
    return value if override is None else float(override)


def check_same_shape(s: Any, other: Any, what: str) -> Any:
    """``other``'s data (array or dask) after checking it has ``s``'s shape."""
    data = other.data if hasattr(other, "axes_manager") else other
    if not hasattr(data, "shape"):
        data = np.asarray(data)
    if tuple(data.shape) != tuple(s.data.shape):
        oname = f"signal '{signal_name(other)}'" if hasattr(other, "axes_manager") else "array"
        am = s.axes_manager
        raise ConfigError(
            f"{what} {oname} has data shape {tuple(data.shape)}, but signal "
            f"'{signal_name(s)}' has {tuple(s.data.shape)} (navigation {am.navigation_shape}, "
            f"signal {am.signal_shape}). Give one label image per frame, of the same size."
        )
    return data


def _core():
    # Imported here: the segmentation core loads torch.
    from .. import segmentation

    return segmentation


def _resolve_model(model: Any, which: str, device: str) -> Any:
    """The loaded model: through :func:`napari_hrtem_transfer.segmentation.resolve_model`
    (packages opened, then the one loader, :func:`napari_hrtem_transfer.inference.load_model`)."""
    from ..segmentation import resolve_model

    return resolve_model(model, which=which, device=device)


#: What a chunk of a lazy signal carries to the core from the signal's metadata: the
#: imaging conditions the OOD verdict fits the Thon rings with (beam energy [eV], Cs [Å]).
_CHUNK_METADATA = ("energy_eV", "Cs_A")


def _check_lazy(s: Any, loaded: Any, px: float | None, name: str) -> dict[str, Any]:
    """What the core checks on the whole input, done at call time for a lazy signal.

    A lazy signal reaches the core chunk by chunk when it is computed; its pixel size is
    checked against the model here (a refusal names the signal, not "data"), and the
    input warnings (STEM, a label mask) are given now, once.  Returns the recorded
    conditions (:data:`_CHUNK_METADATA`) each chunk is segmented with.
    """
    from ..io.frames import check_zoom, input_warnings
    from ..io.hyperspy_integration import from_signal

    seg = _core()
    config = getattr(seg, "SegmentConfig", None)
    cfg = config() if config is not None else None
    model_s = getattr(loaded, "sampling_A", None)
    if cfg is not None and px and model_s and abs(px / model_s - 1.0) > cfg.resample_tolerance:
        if cfg.resample:
            ny, nx = s.data.shape[-2:]
            check_zoom(
                px,
                model_s,
                (int(ny), int(nx)),
                f"signal '{name}'",
                max_zoom=cfg.max_zoom,
                max_resampled_px=cfg.max_resampled_px,
            )
    category = getattr(seg, "SegmentationWarning", UserWarning)
    frames = from_signal(s, allow_reciprocal=True, compute=False)
    frames.name = f"signal '{name}'"
    for text in input_warnings(frames):
        warnings.warn(text, category, stacklevel=4)
    return {k: frames.metadata[k] for k in _CHUNK_METADATA if k in frames.metadata}


def _chunk(frames: np.ndarray, px: float | None, recorded: dict[str, Any], name: str) -> Any:
    """A chunk of whole frames as the core's input, with the signal's recorded conditions."""
    from ..io.frames import Frames

    grey = _grey(frames)
    nav = [
        {"name": f"axis {i}", "size": int(n), "scale": 1.0, "offset": 0.0, "units": None}
        for i, n in enumerate(grey.shape[:-2])
    ]
    return Frames(
        grey.reshape(-1, *grey.shape[-2:]),
        px,
        [],
        metadata={**recorded, "reader_notes": []},
        name=name,
        nav_axes=nav,
    )


def _caution_level(loaded: Any, name: str, model: Any) -> float:
    """The model's caution level of the OOD score (what the core records), at call time.

    Raises
    ------
    ConfigError
        If the model has no usable OOD reference (as the eager path does).
    """
    seg = _core()
    notes: list[str] = []
    ref = seg.ood_reference(loaded, notes)
    if ref is None:
        why = "; ".join(notes) or "no OOD reference"
        raise ConfigError(
            f"no OOD score for signal '{name}' with model {model!r}: {why}. Fit a reference "
            "with 'hrtem-transfer finetune' (it fits one at the end) or "
            "napari_hrtem_transfer.evaluation.fit_ood_reference_for_checkpoint."
        )
    level = getattr(ref, "caution_level", None)
    if level is None or not np.isfinite(float(level)):
        return 1.0  # the core's own fallback for a reference without a level
    return float(level)


def _options(threshold: float | None, **kw: Any) -> dict[str, Any]:
    """Core options; a None threshold is left to the core's default (SegmentConfig)."""
    if threshold is not None:
        kw["threshold"] = float(threshold)
    return kw


def _lazy_provenance(loaded: Any, model: Any, threshold: float | None, which: str) -> dict:
    """What the core would record, known before computing (lazy results)."""
    info = getattr(loaded, "info", None) or {}
    return {
        "model": model if isinstance(model, str) else str(getattr(loaded, "path", model)),
        "model_path": str(getattr(loaded, "path", model)),
        "which": which,
        "weights_sha256": info.get("weights_sha256") if isinstance(info, dict) else None,
        "model_sampling_A": getattr(loaded, "sampling_A", None),
        "threshold": threshold,
        "lazy": True,
    }


def _package_version() -> str:
    from .. import __version__

    return __version__


def _clean(value: Any) -> Any:
    """Metadata-safe value: None and containers become JSON text where needed."""
    if value is None:
        return "None"
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    return json.dumps(value, default=str)


def record(out: Any, key: str, provenance: dict[str, Any]) -> None:
    """Write ``provenance`` under ``metadata.HRTEM_transfer.<key>`` (plain values only)."""
    for k, v in provenance.items():
        out.metadata.set_item(f"{NODE}.{key}.{k}", _clean(v))


def _provenance(res: Any | None, *, model: Any, threshold: float | None, which: str) -> dict:
    prov: dict[str, Any] = {}
    if res is not None and getattr(res, "provenance", None):
        prov.update(res.provenance)
    prov.setdefault(
        "model", model if isinstance(model, str) else str(getattr(model, "path", model))
    )
    prov.setdefault("which", which)
    prov.setdefault("version", _package_version())
    if threshold is not None:
        prov.setdefault("threshold", float(threshold))
    if res is not None and getattr(res, "notes", None):
        prov["notes"] = list(res.notes)
    return prov


def _strip_for_result(out: Any) -> None:
    """A result is not an HRTEM image: plain Signal2D, no nested ground-truth masks."""
    if out.metadata.has_item(f"{NODE}.masks"):
        delattr(out.metadata.get_item(NODE), "masks")
    out.set_signal_type("")


def _whole_frames(data: Any) -> Any:
    nd = data.ndim
    return data.rechunk({nd - 2: -1, nd - 1: -1})


def _grey(frames: Any) -> np.ndarray:
    """A chunk as real numbers: RGB exports become grey by the reader's rule."""
    frames = np.asarray(frames)
    if frames.dtype.names:
        from ..io.frames import ReaderWarning
        from ..io.frames import to_grey as _to_grey

        with warnings.catch_warnings():  # given once per signal by the input checks
            warnings.simplefilter("ignore", ReaderWarning)
            frames = _to_grey(frames, "chunk", [])
    return frames


# ----------------------------------------------------------------------------- segment


#: The passes of the segmentation core: kind -> (OOD verdict, probabilities, dtype, one value
#: per frame rather than per pixel).
_PASSES: dict[str, tuple[bool, bool, Any, bool]] = {
    "mask": (False, False, np.uint8, False),
    "probability": (False, True, np.float32, False),
    "ood": (True, False, np.float64, True),
}


def _call(
    s: Any,
    model: Any,
    sampling_A: float | None,
    threshold: float | None,
    which: str,
    device: str,
    progress: Any,
) -> dict[str, Any]:
    """The call bundle of :func:`_one_pass`: the signal's name and pixel size (checked to be
    a real-space image) with the method's arguments."""
    return dict(
        name=signal_name(s),
        model=model,
        px=_pixel_size(s, sampling_A),
        threshold=threshold,
        which=which,
        device=device,
        progress=progress,
    )


def _one_pass(s: Any, take: Any, kind: str, call: dict[str, Any]) -> tuple[Any, Any, dict, Any]:
    """One pass of the segmentation core over ``s`` (a :data:`_PASSES` kind), kept as
    ``take(result)``; ``call`` holds ``name``, ``model``, ``px``, ``threshold``, ``which``,
    ``device`` and ``progress``.

    Eager: ``(take(result) as dtype, result, {}, None)``.  Lazy: a dask array of
    ``take(result)`` computed block by block on whole frames, no result, the model's
    provenance, the loaded model.
    """
    ood, probabilities, dtype, per_frame = _PASSES[kind]
    seg = _core()
    model, px, which = call["model"], call["px"], call["which"]
    opts = _options(
        call["threshold"], ood=ood, probabilities=probabilities, which=which, device=call["device"]
    )
    if not s._lazy:
        res = seg.segment(s, model=model, sampling_A=px, progress=call["progress"], **opts)
        return np.asarray(take(res), dtype=dtype), res, {}, None
    loaded = _resolve_model(model, which, call["device"])
    recorded = _check_lazy(s, loaded, px, call["name"])
    data = _whole_frames(s.data)
    nd = data.ndim

    def block(frames: np.ndarray) -> np.ndarray:
        chunk = _chunk(frames, px, recorded, f"signal '{call['name']}'")
        res = seg.segment(chunk, model=loaded, sampling_A=px, **opts)
        shape = frames.shape[:-2] if per_frame else frames.shape
        return np.asarray(take(res), dtype=dtype).reshape(shape)

    drop = {"drop_axis": [nd - 2, nd - 1]} if per_frame else {}
    meta = np.empty((0,) * (nd - 2 if per_frame else nd), dtype)
    values = data.map_blocks(block, dtype=dtype, meta=meta, **drop)
    return values, None, _lazy_provenance(loaded, model, call["threshold"], which), loaded


def segment(
    s: Any,
    *,
    model: Any,
    threshold: float | None,
    probabilities: bool,
    sampling_A: float | None,
    which: str,
    device: str,
    progress: Any,
) -> Any:
    """See :meth:`napari_hrtem_transfer.hyperspy.signals.HRTEM.segment`."""
    call = _call(s, model, sampling_A, threshold, which, device, progress)
    name, px = call["name"], call["px"]
    kind = "probability" if probabilities else "mask"
    take = (lambda r: r.proba) if probabilities else (lambda r: r.labels)
    out_data, res, known, _ = _one_pass(s, take, kind, call)
    if res is not None and out_data.shape != s.data.shape:  # the contract says it never differs
        raise RuntimeError(
            f"segmentation returned shape {out_data.shape} for signal '{name}' of shape "
            f"{s.data.shape}; please report this."
        )
    out = s._deepcopy_with_new_data(out_data)
    _strip_for_result(out)
    out.metadata.General.title = (
        f"{name} – {'particle probability' if probabilities else 'particles'}"
    )
    out.metadata.Signal.quantity = PROBA_QUANTITY if probabilities else MASK_QUANTITY
    prov = {**known, **_provenance(res, model=model, threshold=threshold, which=which)}
    prov["sampling_A"] = px
    prov["output"] = "probability" if probabilities else "mask"
    record(out, "segmentation", prov)
    return out


# ----------------------------------------------------------------------------- per-frame signals


def navigation_signal(s: Any, values: Any, *, title: str, quantity: str) -> Any:
    """A signal over ``s``'s navigation axes holding ``values`` (numpy or dask)."""
    am = s.axes_manager
    shape = tuple(am.navigation_shape[::-1]) if am.navigation_dimension else (1,)
    lazy = hasattr(values, "dask")
    values = values.reshape(shape)
    placeholder = np.zeros(shape, dtype=float)
    out = s._get_navigation_signal(data=placeholder if lazy else np.asarray(values, float))
    if lazy:
        out = out.as_lazy()
        out.data = values
    for key in ("General", "Acquisition_instrument", "Sample"):
        if s.metadata.has_item(key):
            out.metadata.add_dictionary({key: s.metadata.get_item(key).as_dictionary()})
    out.metadata.General.title = title
    out.metadata.set_item("Signal.quantity", quantity)
    return out


def ood_score(
    s: Any,
    *,
    model: Any,
    sampling_A: float | None,
    which: str,
    device: str,
    progress: Any,
    components: bool,
) -> Any:
    """See :meth:`napari_hrtem_transfer.hyperspy.signals.HRTEM.ood_score`."""
    call = _call(s, model, sampling_A, None, which, device, progress)
    name, px = call["name"], call["px"]
    if components:
        return _ood_components(s, model, px, name, which=which, device=device, progress=progress)

    def _scores(res: Any) -> np.ndarray:
        if res.ood_score is None:
            why = "; ".join(getattr(res, "notes", []) or []) or "no OOD reference"
            raise ConfigError(
                f"no OOD score for signal '{name}' with model {model!r}: {why}. Fit a reference "
                "with 'hrtem-transfer finetune' (it fits one at the end) or "
                "napari_hrtem_transfer.evaluation.fit_ood_reference_for_checkpoint."
            )
        return np.asarray(res.ood_score, dtype=np.float64)

    values, res, known, loaded = _one_pass(s, _scores, "ood", call)
    if res is None:
        caution = _caution_level(loaded, name, model)
    else:
        caution = getattr(res, "ood_caution", None)
    out = navigation_signal(s, values, title=f"{name} – OOD score", quantity=OOD_QUANTITY)
    prov = {**known, **_provenance(res, model=model, threshold=None, which=which)}
    prov["caution_level"] = 1.0 if caution is None else float(caution)
    record(out, "ood", prov)
    return out


def _ood_components(
    s: Any, model: Any, px: float | None, name: str, *, which: str, device: str, progress: Any
) -> dict[str, Any]:
    """The verdict of every frame as signals over ``s``'s navigation axes: ``"score"`` (with
    ``caution_level``, per-frame ``caution`` flags and ``reasons`` in its metadata),
    ``"caution"`` (1 = flagged), ``"estimated_defocus_nm"`` and every numeric component.

    One pass of the segmentation core; a lazy signal is read one frame at a time (the
    results are small: one value per frame).
    """
    seg = _core()
    if s._lazy:
        _check_lazy(s, _resolve_model(model, which, device), px, name)
    res = seg.segment(
        s,
        model=model,
        sampling_A=px,
        progress=progress,
        **_options(None, ood=True, probabilities=False, which=which, device=device),
    )
    if res.ood_score is None:
        why = "; ".join(getattr(res, "notes", []) or []) or "no OOD reference"
        raise ConfigError(f"no OOD verdict for signal '{name}' with model {model!r}: {why}.")
    rows = res.frame_table()
    prov = {**_provenance(res, model=model, threshold=None, which=which)}
    prov["caution_level"] = float(res.ood_caution)
    prov["reasons"] = [list(r.get("reasons") or []) for r in rows]
    prov["caution"] = [bool(r.get("caution")) for r in rows]
    prov["imaging_domain"] = getattr(res, "imaging_domain", None) or {}

    def sig(values: Any, what: str, quantity: str) -> Any:
        out = navigation_signal(
            s, np.asarray(values, dtype=float), title=f"{name} – {what}", quantity=quantity
        )
        record(out, "ood", prov)
        return out

    out = {
        "score": sig([r["ood_score"] for r in rows], "OOD score", OOD_QUANTITY),
        "caution": sig(prov["caution"], "OOD caution flag", "1 = treat with caution"),
        "estimated_defocus_nm": sig(
            [
                np.nan if r.get("estimated_defocus_nm") is None else r["estimated_defocus_nm"]
                for r in rows
            ],
            "defocus estimated from the Thon rings",
            "estimated defocus [nm] (abTEM sign; see defocus_sign_determined)",
        ),
    }
    keys = [
        k
        for k, v in (rows[0].get("ood_components") or {}).items()
        if isinstance(v, int | float | bool | None) and k not in out
    ]
    for k in keys:
        vals = [(r.get("ood_components") or {}).get(k) for r in rows]
        out[k] = sig([np.nan if v is None else float(v) for v in vals], f"OOD {k}", k)
    return out


# ----------------------------------------------------------------------------- evaluate


def evaluate(
    s: Any,
    masks: Any,
    *,
    model: Any,
    threshold: float | None,
    sampling_A: float | None,
    which: str,
    device: str,
) -> dict[str, Any]:
    """See :meth:`napari_hrtem_transfer.hyperspy.signals.HRTEM.evaluate`."""
    from ..evaluation.metrics import binary_cross_entropy, dice, iou

    name = signal_name(s)
    target = check_same_shape(s, masks, "masks")
    px = _pixel_size(s, sampling_A)
    seg = _core()
    ny, nx = s.data.shape[-2:]

    def metrics(frames: np.ndarray, truth: np.ndarray, loaded: Any) -> np.ndarray:
        res = seg.segment(
            _grey(frames),
            model=loaded,
            sampling_A=px,
            **_options(threshold, ood=False, probabilities=True, which=which, device=device),
        )
        p = np.asarray(res.proba, dtype=np.float64).reshape(-1, ny, nx)
        lab = np.asarray(res.labels).reshape(-1, ny, nx) > 0
        t = np.asarray(truth).reshape(-1, ny, nx) > 0
        vals = np.stack(
            [
                np.atleast_1d(binary_cross_entropy(p, t, from_logits=False)),
                np.atleast_1d(dice(lab, t)),
                np.atleast_1d(iou(lab, t)),
            ],
            axis=-1,
        )
        return vals.reshape(*frames.shape[:-2], 3)

    if s._lazy or hasattr(target, "dask"):
        import dask.array as da

        loaded = _resolve_model(model, which, device)
        data = _whole_frames(s.data if s._lazy else da.from_array(s.data))
        truth = da.asarray(target).rechunk(data.chunks)
        nd = data.ndim
        stacked = da.map_blocks(
            lambda f, t: metrics(f, t, loaded),
            data,
            truth,
            drop_axis=[nd - 1],
            chunks=(*data.chunks[:-2], (3,)),
            dtype=np.float64,
            meta=np.empty((0,) * (nd - 1), np.float64),
        )
        parts = [stacked[..., i] for i in range(3)]
    else:
        stacked = metrics(_grey(s.data), np.asarray(target), _resolve_model(model, which, device))
        parts = [stacked[..., i] for i in range(3)]
    titles = {
        "loss": ("binary cross-entropy", "Binary cross-entropy per pixel (nats)"),
        "dice": ("Dice", "Dice coefficient"),
        "iou": ("IoU", "Intersection over union"),
    }
    prov = _provenance(None, model=model, threshold=threshold, which=which)
    mname = signal_name(masks) if hasattr(masks, "axes_manager") else "array"
    prov["masks"] = mname
    out = {}
    for (key, (short, quantity)), values in zip(titles.items(), parts, strict=True):
        sig = navigation_signal(s, values, title=f"{name} – {short}", quantity=quantity)
        record(sig, "evaluation", prov)
        out[key] = sig
    return out


# ----------------------------------------------------------------------------- finetune


def finetune(
    s: Any,
    labels: Any,
    *,
    model: Any,
    freeze: str | None,
    epochs: int | None,
    out: Any,
    sampling_A: float | None,
    **kwargs: Any,
):
    """See :meth:`napari_hrtem_transfer.hyperspy.signals.HRTEM.finetune`."""
    from pathlib import Path

    target = check_same_shape(s, labels, "labels")
    px = _pixel_size(s, sampling_A)
    if out is None:
        raise ConfigError(
            "finetune needs out=<folder> for the new checkpoint (e.g. out='models/my_scope')."
        )
    ny, nx = s.data.shape[-2:]
    images = np.asarray(s.data.compute() if s._lazy else s.data).reshape(-1, ny, nx)
    truth = np.asarray(target.compute() if hasattr(target, "compute") else target)
    truth = truth.reshape(-1, ny, nx)
    if epochs is not None:
        kwargs["epochs"] = int(epochs)
    if freeze is not None:
        kwargs["freeze"] = freeze
    from ..annotations import finetune_on_annotations  # loads torch

    result = finetune_on_annotations(
        images, truth, model=model, out_dir=Path(out), sampling_A=px, **kwargs
    )
    return Path(getattr(result, "out_dir", out))
