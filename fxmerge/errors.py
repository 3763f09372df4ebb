"""Errors raised by fxmerge. Each names the node or module and the rule that refused it."""


class FxMergeError(Exception):
    """Base class of every error fxmerge raises on purpose."""


class TraceError(FxMergeError):
    """The model could not be traced or its shapes could not be propagated."""


class SpaceError(FxMergeError):
    """The traced graph gives no usable merge space (or a bad `exclude`)."""


class PlanError(FxMergeError):
    """A plan does not fit the graph it is applied to, or breaks a merge rule."""


class MergeError(FxMergeError):
    """A graph cannot be merged exactly (training-mode BN, unknown op inside a block, ...)."""


class TableError(FxMergeError):
    """A latency or importance table is incomplete, invalid, or made for another graph."""


class BackendError(FxMergeError):
    """A backend that was asked for cannot run here (not installed, or not on this device)."""


class InfeasibleBudget(FxMergeError):
    """No plan meets the latency budget; the message states the smallest achievable latency.
    `plan` is the fastest plan found (over the budget), where there is one."""

    def __init__(self, message: str, plan: object = None) -> None:
        super().__init__(message)
        self.plan = plan


class ArgumentError(FxMergeError, ValueError, TypeError):
    """An argument given to fxmerge is invalid: a wrong value or type, or a bad command-line
    form (also a ValueError and a TypeError, what such mistakes raise in Python)."""


class ModelSpecError(ArgumentError):
    """A model named on the command line or to `fxmerge.models.load_model` cannot be
    found or built (the command line exits with 2, a usage error)."""


def one_of(kind: type, value: object, name: str):
    """The member of the enum `kind` that `value` names; `ArgumentError` naming `name` and
    every member for anything else."""
    try:
        return kind(value)
    except ValueError:
        raise ArgumentError(f"{name} must be one of {', '.join(m.value for m in kind)}, got "
                            f"{value!r}") from None
