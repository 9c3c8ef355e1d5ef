"""MOLoRA as a peft method. Importing this package registers it (idempotent).

After ``import citi_engine.molora``, ``peft.get_peft_model(model, MoloraConfig(...))``,
``save_pretrained`` and ``PeftModel.from_pretrained`` work like for any built-in peft method.

How: ``peft.utils.register_peft_method`` only accepts names that are already members of peft's
``PeftType`` str-Enum, which has no MOLoRA member, so one is added to the enum first. That relies on
peft internals (the enum, the registration function, the mapping tables); tests/engine/test_molora.py
checks each of them and fails loudly when a peft release changes one. Tested range: TESTED_PEFT.
"""

from __future__ import annotations

import warnings

import peft
from packaging.version import Version
from peft.utils import PeftType, register_peft_method

from .config import PEFT_TYPE_NAME, MoloraConfig
from .layer import FrozenMoloraLinear, MoloraLayer, MoloraLinear, molora_mix
from .model import MoloraModel

# The peft versions the enum extension and registration are tested against (GPU: 0.21.0, CPU: 0.21.2).
TESTED_PEFT = (Version("0.21.0"), Version("0.22.0"))

__all__ = [
    "PEFT_TYPE_NAME", "TESTED_PEFT", "FrozenMoloraLinear", "MoloraConfig", "MoloraLayer", "MoloraLinear", "MoloraModel",
    "molora_mix", "register",
]


def _add_peft_type_member(name: str) -> PeftType:
    """Add ``name`` (its own value) to the PeftType enum, as the class statement would have."""
    if name in PeftType._member_map_:
        return PeftType._member_map_[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    # type.__setattr__: EnumType.__setattr__ refuses to touch members; this is the attribute lookup path.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def register() -> None:
    """Make MOLoRA a peft method: add the PeftType member and register config and tuner. Safe to call twice."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    if not TESTED_PEFT[0] <= Version(peft.__version__) < TESTED_PEFT[1]:
        warnings.warn(
            f"citi_engine.molora is tested with peft >={TESTED_PEFT[0]},<{TESTED_PEFT[1]} but peft {peft.__version__} "
            "is installed; run tests/engine/test_molora.py before trusting saved adapters",
            RuntimeWarning,
            stacklevel=2,
        )
    peft_type = _add_peft_type_member(PEFT_TYPE_NAME)
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered is MoloraConfig and PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is MoloraModel:
        return
    if registered is not None:
        # A reloaded module brings new classes under the same name; point peft at the current ones.
        from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = MoloraConfig
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = MoloraModel
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = MoloraModel.prefix
        return
    register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=MoloraConfig, model_cls=MoloraModel)


register()
