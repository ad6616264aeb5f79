"""``setting()``: a config dataclass field that is also a flag of the binaries (one definition).

Each user-facing setting is declared once, as a field of a frozen config dataclass, with its
default, its help text and (in the dataclass's ``__post_init__``) its validation. The binaries
(``kd_histo.cli.flags_common``) generate their absl flags from these fields and turn the parsed
flags back into the configs, so neither a default nor a help text is written a second time.

Field metadata read by the binaries:
  help: the flag's help text; a field without it is no flag (set by code, e.g. the protocol).
  flag: the flag's name where it differs from the field's (``--optimizer`` -> ``OptimConfig.name``).
  choices: the allowed values of a string flag (an absl enum: a wrong value is refused at parsing).
  flag_default: the binaries' default where it differs from the library's, with the reason at the
    field (absl holds one default per flag name in a process, and several binaries share names).
  unset_is_default: a flag the command line does not give leaves the field at its default (the
    flag's own default is then only what ``--help`` shows).

Not here: absl (the library never imports it), the flags of the binaries alone (``--smoke``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

# One help text for the flag of several binaries (train, evaluate, predict) and their configs.
SKIP_CORRUPT_HELP = (
    "Converted data: skip corrupt records (bad bytes, a wrong tile size, a damaged shard's "
    "tail) and say how many, instead of stopping at the first with the shard's name."
)

# Convert and predict: slides read at a µm/px need their level-0 µm/px.
SLIDE_MPP_HELP = "Level-0 µm/px for slides whose metadata lacks it (0 = from the metadata)."

OOD_WARN_HELP = (
    "Warn about a slide when more than this fraction of its tiles lie out of the model's domain "
    "(ood_flag: a score above the threshold that 5% of the val tiles exceed)."
)


# One help text for the job-array flags of kd-histo-convert and kd-histo-predict.
TASK_INDEX_HELP = "This task among --num_tasks (Slurm/Kubernetes array index)."
NUM_TASKS_HELP = "Independent tasks; with > 1, finish with --merge."


def check_choice(name: str, value: str, options: tuple[str, ...]) -> None:
    """Raises ValueError, in one line naming the setting and the choices, unless ``value`` is one
    of ``options`` (the check of a string setting's ``__post_init__``)."""
    if value not in options:
        raise ValueError(f"{name} {value!r} unknown; choose one of {', '.join(options)}")


def setting(default: Any = dataclasses.MISSING, help: str = "", **flag: Any) -> Any:  # noqa: A002
    """A dataclass field with a default and the metadata its flag is generated from.

    Args:
      default: the field's default; omitted = a required field (the flag is then required too).
      help: the flag's help text.
      **flag: further metadata: ``flag``, ``choices``, ``flag_default``, ``unset_is_default``
        (see the module docstring).
    """
    unknown = set(flag) - {"flag", "choices", "flag_default", "unset_is_default"}
    if unknown:
        raise TypeError(f"setting() got unknown metadata {sorted(unknown)}")
    return dataclasses.field(default=default, metadata={"help": help, **flag})
