"""Import MediaPipe's legacy solutions under protobuf 7.

mediapipe 0.10.21 is the last release whose models ship in the wheel (later ones download
them at run time, which fails offline). It was built against protobuf 4, and this
environment has protobuf 7 (the version pinned for wandb), which removed two APIs it uses:

- ``FieldDescriptor.label`` (``is_repeated`` replaces it), read by ``SolutionBase`` to set
  calculator options. When ``label`` is missing, that one method is replaced by an
  equivalent that asks ``is_repeated``.
- ``MessageFactory.GetPrototype`` (protobuf 6.30 removed it; the module-level
  ``GetMessageClass`` replaces it), looked up by the pybind11_protobuf code inside
  MediaPipe's bindings when they are imported. Missing, it prints ``AttributeError:
  'MessageFactory' object has no attribute 'GetPrototype'`` and that code falls back to
  importing ``*_pb2`` modules. The method is put back, returning ``GetMessageClass``'s
  class, before ``mediapipe`` is imported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from data_pipelines.annotators.base import optional_import

_patched = False


def _set_fields(options: Any, fields: list[tuple[str, Any]]) -> None:
    for name, value in fields:
        if value is None:
            options.ClearField(name)
        elif options.DESCRIPTOR.fields_by_name[name].is_repeated:
            if not isinstance(value, Iterable):
                raise ValueError(f"{name} is a repeated option, got {type(value).__name__}")
            options.ClearField(name)
            getattr(options, name).extend(value)
        else:
            setattr(options, name, value)


def _modify_calculator_options(self, graph_config: Any, params: Mapping[str, Any]) -> None:
    from mediapipe.python import solution_base

    by_node: dict[str, list[tuple[str, Any]]] = {}
    for compound, value in params.items():
        node_name, _, field = compound.partition(".")
        if not field or "." in field:
            raise ValueError(f'The key "{compound}" in the calculator_params is invalid.')
        by_node.setdefault(node_name, []).append((field, value))
    modified = 0
    for node in graph_config.node:
        if node.name not in by_node:
            continue
        options_type = solution_base.CALCULATOR_TO_OPTIONS.get(node.calculator)
        if options_type is None:
            raise ValueError(f"Modifying the calculator options of {node.name} is not supported.")
        if node.HasField("options") and node.node_options:
            raise ValueError(f"{node.name} has both options and node_options")
        if node.node_options:
            wanted = options_type.DESCRIPTOR.full_name
            packed = next(
                (e for e in node.node_options if e.type_url.split("/")[-1] == wanted), None
            )
            options = options_type() if packed is None else options_type.FromString(packed.value)
            _set_fields(options, by_node[node.name])
            if packed is None:
                node.node_options.add().Pack(options)
            else:
                packed.value = options.SerializeToString()
        else:
            _set_fields(node.options.Extensions[options_type.ext], by_node[node.name])
        modified += 1
    if modified < len(by_node):
        raise ValueError("Not all calculator params are valid.")


def _get_prototype(self, descriptor: Any) -> type:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


def provide_get_prototype() -> None:
    """Give protobuf's ``MessageFactory`` its removed ``GetPrototype`` when it lacks one."""
    from google.protobuf import message_factory

    if not hasattr(message_factory.MessageFactory, "GetPrototype"):
        message_factory.MessageFactory.GetPrototype = _get_prototype


def import_mediapipe(why: str, required: bool) -> Any | None:
    """``mediapipe`` with its legacy solutions usable under this protobuf, or None."""
    global _patched
    provide_get_prototype()  # before the import: the bindings look it up while loading
    mp = optional_import("mediapipe", why, required)
    if mp is None or _patched:
        return mp
    from google.protobuf import descriptor
    from mediapipe.python import solution_base

    if not hasattr(descriptor.FieldDescriptor, "label"):
        solution_base.SolutionBase._modify_calculator_options = _modify_calculator_options
    _patched = True
    return mp
