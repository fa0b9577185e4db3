"""The model's imaging domain (training defoci, energy, Cs, focal spread, dose, pixel size) from
a dataset's simulation metadata, or, for annotated frames, the parent's domain widened by the
frames' estimated defoci; and the parent model's reference."""

from __future__ import annotations

import numpy as np

from ...errors import CheckpointError
from .reference import (
    ImagingDomain,
    OODReference,
    load_ood_reference,
)


def _simulation_configs(info: dict) -> list[dict]:
    """The simulation configs in a dataset's info (merged datasets hold several)."""
    out = []
    if isinstance(info.get("config"), dict):
        out.append(info["config"])
    for sub in info.get("merged_from") or []:
        if isinstance(sub, dict):
            out.extend(_simulation_configs(sub))
    return out


def _domain_from_info(info: dict | None, sm) -> dict | None:
    """An imaging domain from ``info["train_defocus_nm"]`` and the simulator's defaults."""
    doms = [float(d) for d in (info or {}).get("train_defocus_nm") or []]
    if not doms:
        return None
    return ImagingDomain(
        defocus_nm_range=(min(doms), max(doms)),
        defocus_nm=doms,
        sampling_A=getattr(sm, "sampling_A", None),
        source="training defoci given to the fit; other values: the simulator's defaults",
    ).model_dump()


def _parent_reference(sm) -> OODReference | None:
    """The OOD reference of the model this one was fine-tuned from, if readable."""
    parent = (sm.info or {}).get("parent") or {}
    path = parent.get("path") if isinstance(parent, dict) else None
    if not path:
        return None
    try:
        return load_ood_reference(path, parent.get("weights_sha256"))
    except CheckpointError:
        return None


#: Most training frames whose defocus is estimated for a domain without metadata.
MAX_DOMAIN_ESTIMATES = 16


def imaging_domain_for(dataset, doms, sm, parent_ref=None, items=None) -> dict | None:
    """The imaging domain of a model trained on ``dataset`` at defoci ``doms`` [nm].

    Simulated datasets: their metadata (beam energy, Cs, focal spread, dose, pixel size)
    and the training defoci.  Annotated frames (``info["source"] == "annotated frames"``,
    :func:`~napari_hrtem_transfer.annotations.dataset_from_annotations`): the parent model's domain
    (or the simulator's defaults) widened to the training frames' estimated defoci
    (:func:`~napari_hrtem_transfer.evaluation.ctf.estimate_ctf`; magnitude when the sign is
    not determined, both signs then).
    """
    info = dict(getattr(dataset, "info", {}) or {})
    cfgs = _simulation_configs(info)
    sampling = float(dataset.sampling_A)
    annotated = info.get("source") == "annotated frames"
    if doms and (cfgs or not annotated):
        c0 = cfgs[0] if cfgs else {}
        fs = [float(c.get("focal_spread_A", 10.0)) for c in cfgs]
        return ImagingDomain(
            defocus_nm_range=(min(doms), max(doms)),
            defocus_nm=[float(d) for d in doms],
            energy_eV=float(getattr(dataset, "energy_eV", c0.get("energy_eV", 300e3))),
            Cs_mm=float(c0.get("Cs_A", 5e4)) * 1e-7,
            focal_spread_A=max(fs) if fs else 10.0,
            dose_e_per_A2=getattr(dataset, "dose_e_per_A2", None),
            sampling_A=sampling,
            source="the training dataset's simulation metadata"
            if cfgs
            else "the training dataset's defoci, energy and dose; Cs and focal spread: the "
            "simulator's defaults",
        ).model_dump()
    from ..ctf import estimate_ctf

    base = None if parent_ref is None else parent_ref.domain
    base = dict(base or {})
    energy = float(base.get("energy_eV") or getattr(dataset, "energy_eV", 300e3))
    cs = float(base.get("Cs_mm") if base.get("Cs_mm") is not None else 0.005)
    est: list[float] = []
    pairs = [] if items is None else [tuple(int(v) for v in p) for p in np.asarray(items)]
    for di, ii in sorted(set(pairs))[:MAX_DOMAIN_ESTIMATES]:
        frame = np.asarray(dataset.images[di, ii], dtype=np.float32)
        try:
            e = estimate_ctf(
                frame,
                sampling,
                energy_eV=energy,
                Cs_mm=cs,
                tile_px=max(32, min(512, min(frame.shape)) // 2 * 2),
            )
        except ValueError:
            continue
        if e.defocus_nm is None:
            continue
        est.extend(
            [float(e.defocus_nm)]
            if e.sign_determined
            else [float(e.defocus_abs_nm), -float(e.defocus_abs_nm)]
        )
    lo_hi = list(base.get("defocus_nm_range") or []) + est
    if not lo_hi:
        lo_hi = [float(d) for d in doms] if doms else []
    if not lo_hi:
        return None
    return ImagingDomain(
        defocus_nm_range=(min(lo_hi), max(lo_hi)),
        defocus_nm=sorted(set([float(d) for d in base.get("defocus_nm") or []] + est)),
        energy_eV=energy,
        Cs_mm=cs,
        focal_spread_A=float(base.get("focal_spread_A") or 10.0),
        dose_e_per_A2=base.get("dose_e_per_A2"),
        sampling_A=sampling,
        source=(
            ("the parent model's domain" if base else "the simulator's defaults")
            + f" and {len(est)} estimated defoci of the training frames"
        ),
    ).model_dump()


def _has_domain(dataset, d) -> bool:
    try:
        dataset.defocus_index(d)
    except Exception:  # noqa: BLE001 - not in this dataset
        return False
    return True
