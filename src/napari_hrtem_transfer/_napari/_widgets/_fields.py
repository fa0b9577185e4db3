"""Widget fields from the pydantic configs: defaults, limits, choices and help text live once,
in :class:`~napari_hrtem_transfer.simulate.SimulationConfig` and
:class:`~napari_hrtem_transfer.training.TrainConfig`; validation errors name the widget's
field, not a command-line flag."""

from __future__ import annotations

import re
import typing
from typing import Any

from magicgui.widgets import ComboBox, FloatSpinBox, SpinBox


def field_info(model: type, name: str) -> dict[str, Any]:
    """Default, bounds (``min``/``max``, open bounds nudged inward) and description."""
    f = model.model_fields[name]
    info: dict[str, Any] = {"default": f.get_default(call_default_factory=True),
                            "description": f.description or _attr_doc(model, name)}
    for m in f.metadata:
        for attr, key, nudge in (("ge", "min", 0), ("gt", "min", 1), ("le", "max", 0),
                                 ("lt", "max", -1)):
            v = getattr(m, attr, None)
            if v is not None:
                info[key] = v + nudge * (1 if isinstance(v, int) else 1e-9)
    return info


def _attr_doc(model: type, name: str) -> str:
    f = model.model_fields[name]
    return (getattr(f, "description", None) or "").strip()


def literal_choices(model: type, name: str) -> list[Any]:
    """The values of a ``Literal`` field (``None`` dropped from ``Optional``)."""
    ann = model.model_fields[name].annotation
    args = typing.get_args(ann)
    if typing.get_origin(ann) is typing.Literal:
        return list(args)
    for a in args:
        if typing.get_origin(a) is typing.Literal:
            return list(typing.get_args(a))
    return []


def int_widget(model: type, name: str, label: str, **kw: Any) -> SpinBox:
    """A SpinBox with the field's default, limits and description."""
    info = field_info(model, name)
    default = info["default"] if info["default"] is not None else kw.pop("none_value", 0)
    return SpinBox(label=label, value=kw.pop("value", default),
                   min=int(kw.pop("min", info.get("min", 0))),
                   max=int(kw.pop("max", info.get("max", 2**31 - 1))),
                   tooltip=kw.pop("tooltip", info["description"]), **kw)


def float_widget(model: type, name: str, label: str, decimals: int = 4,
                 **kw: Any) -> FloatSpinBox:
    """A FloatSpinBox with the field's default, limits and description."""
    info = field_info(model, name)
    default = info["default"] if info["default"] is not None else kw.pop("none_value", 0.0)
    w = FloatSpinBox(label=label, value=kw.pop("value", default),
                     min=float(kw.pop("min", info.get("min", 0.0))),
                     max=float(kw.pop("max", info.get("max", 1e9))),
                     tooltip=kw.pop("tooltip", info["description"]), **kw)
    w.native.setDecimals(decimals)
    return w


def choice_widget(model: type, name: str, label: str, **kw: Any) -> ComboBox:
    """A ComboBox of a Literal field's values."""
    info = field_info(model, name)
    return ComboBox(label=label, choices=literal_choices(model, name),
                    value=kw.pop("value", info["default"]),
                    tooltip=kw.pop("tooltip", info["description"]), **kw)


_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)")


def widget_message(message: str, labels: dict[str, str], field: str | None = None) -> str:
    """Rewrite a validation message for a form: config field names and CLI flags become the
    widget's labels (``labels`` maps config field -> label)."""
    flag_labels = {k.replace("_", "-"): v for k, v in labels.items()}
    flag_labels.update({"size": labels.get("image_size_px", "image size"),
                        "defocus": labels.get("defocus_nm", "defoci"),
                        "dose": labels.get("dose_e_per_A2", "dose")})

    def flag(m: re.Match) -> str:
        name = m.group(1)
        return f"'{flag_labels[name]}'" if name in flag_labels else f"the setting '{name}'"

    text = _FLAG.sub(flag, message)
    for key, label in sorted(labels.items(), key=lambda kv: -len(kv[0])):
        text = re.sub(rf"(?<![\w'])({re.escape(key)})(?=\s*[:=(])", f"'{label}'", text)
    if field and field in labels and f"'{labels[field]}'" not in text:
        text = f"'{labels[field]}': {text}"
    return text
